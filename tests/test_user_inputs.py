"""What a user of the Python API meets first: checkpoints load from either path form, and a batch
the model cannot take stops with one BoundError line before any bound pass."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import checkpoints
import local_bound
import models
from settings import LANCZOS

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / 'pretrained' / 'mnist_relux_sample_best.pth'


def test_checkpoint_path_accepts_the_prefix_and_the_file(tmp_path):
    assert checkpoints.checkpoint_path('pretrained/x') == 'pretrained/x_best.pth'
    assert checkpoints.checkpoint_path('pretrained/x_best.pth') == 'pretrained/x_best.pth'
    assert checkpoints.checkpoint_path('a/authors.pth') == 'a/authors.pth'
    other = tmp_path / 'weights.pt'                 # an existing file of another suffix is taken as it is
    other.write_bytes(b'')
    assert checkpoints.checkpoint_path(other) == str(other)
    assert checkpoints.checkpoint_path(tmp_path / 'run') == str(tmp_path / 'run') + '_best.pth'


def test_load_model_takes_both_forms_and_refuses_a_missing_file():
    by_file, _ = checkpoints.load_model(str(SHIPPED), 'mnist', 'relux')
    by_prefix, _ = checkpoints.load_model(str(SHIPPED)[:-len('_best.pth')], 'mnist', 'relux')
    for a, b in zip(by_file.state_dict().values(), by_prefix.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(checkpoints.CheckpointError, match='checkpoint not found: .*nothing_best.pth'):
        checkpoints.load_model('pretrained/nothing', 'mnist', 'relux')


@pytest.fixture(scope='module')
def mnist_net():
    torch.manual_seed(0)
    return models.select_model('mnist', 'relux', 1.0, 'cpu').eval()


@pytest.mark.parametrize('make_x, message', [
    (lambda: torch.rand(1, 28, 28), r'x of shape \(1, 28, 28\) does not fit .*layer 0 \(Conv2d\) takes \[B, 1, H, W\]'
                                    r'.*one unbatched image\? pass x.unsqueeze\(0\)'),
    (lambda: torch.rand(4, 28, 28), r'no channel dimension\? pass x.unsqueeze\(1\)'),
    (lambda: torch.rand(4, 3, 32, 32), r'layer 0 \(Conv2d\) takes \[B, 1, H, W\], here \[3, 32, 32\]'),
    (lambda: torch.rand(4, 1, 32, 32), r'layer \d+ \(Linear\) takes \[B, \d+\], here \[\d+\] '
                                       r'\(the model was built for images of another size\)'),
    (lambda: torch.rand(4, 1, 2, 2), r'images too small'),
    (lambda: (255 * torch.rand(4, 1, 28, 28)).to(torch.uint8), r'floating-point tensor of images in \[0, 1\], not dtype torch.uint8'),
    (lambda: torch.rand(4, 1, 28, 28, dtype=torch.float64), r'x is torch.float64 on cpu but the model is torch.float32'),
    (lambda: [[0.0]], r'not list'),
])
def test_a_batch_the_model_cannot_take_is_one_bound_error(mnist_net, make_x, message):
    x = make_x()
    y = torch.zeros(len(x), dtype=torch.long)
    for call in (lambda: local_bound.certify(mnist_net, x, y, 0.1, LANCZOS),
                 lambda: local_bound.bound_outputs(mnist_net, x, y, 0.1, LANCZOS),
                 lambda: local_bound.local_lipschitz(mnist_net, x, 0.1, LANCZOS)):
        with pytest.raises(local_bound.BoundError, match=message) as error:
            call()
        assert '\n' not in str(error.value)


@pytest.mark.parametrize('y, message', [
    (torch.zeros(3, dtype=torch.long), r'y must be integer labels of shape \(4,\)'),
    (torch.zeros(4), r'not torch.float32 of shape \(4,\)'),
    (torch.tensor([0, 1, 2, 10]), r'labels must lie in 0..9 \(the model has 10 logits\), not 0..10'),
    (torch.tensor([0, -1, 2, 3]), r'not -1..3'),
])
def test_labels_that_do_not_fit_are_one_bound_error(mnist_net, y, message):
    with pytest.raises(local_bound.BoundError, match=message):
        local_bound.certify(mnist_net, torch.rand(4, 1, 28, 28), y, 0.1, LANCZOS)


def test_the_check_follows_flatten_and_linear_layers():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    local_bound.check_batch(mlp, torch.rand(2, 3, 2, 2), torch.tensor([0, 2]))   # 12 features: fits
    with pytest.raises(local_bound.BoundError, match=r'layer 1 \(Linear\) takes \[B, 12\], here \[13\]'):
        local_bound.check_batch(mlp, torch.rand(2, 13))
    flat = nn.Sequential(nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(local_bound.BoundError, match=r'one unbatched example\? pass x.unsqueeze\(0\)'):
        local_bound.check_batch(flat, torch.rand(12))
    assert local_bound.local_lipschitz(flat, torch.rand(2, 12), 0.1, LANCZOS).shape == (2,)
