"""Certificates that cannot lie: NaN/inf models and inputs, ties, bad flags, broken checkpoints,
training that stops on a non-finite value and resumes from the last good checkpoint."""
import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset

import checkpoints
import local_bound
import trainer
import utils
from settings import AUTHORS


def _mnist_batch(n=6, seed=0):
    torch.manual_seed(seed)
    return torch.rand(n, 1, 28, 28), torch.arange(n) % 10


def _easy_model():
    """A small model that certifies its own predictions at a tiny eps (the test needs positives)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


# ----------------------------------------------------------------------------- decisions

@pytest.mark.parametrize('value', [math.nan, math.inf, -math.inf])
def test_a_model_with_non_finite_weights_certifies_nothing(value):
    model = utils.select_model('mnist', 'relux')
    x, y = _mnist_batch()
    with torch.no_grad():
        model[13].weight[3, 5] = value          # one bad entry of the last layer suffices
    out = local_bound.bound_outputs(model, x, y, 0.1, AUTHORS.replace(sniter=3, opt_iter=3))
    assert not local_bound.certify(model, x, y, 0.1, AUTHORS.replace(sniter=3, opt_iter=3)).any()
    assert not local_bound.certified_predictions(out, y).any()
    if math.isnan(value):
        assert not local_bound.correct_predictions(out.logits, y).any()


def test_all_nan_weights_certify_nothing_even_for_label_zero():
    """The bug of the issue: an all-NaN row's argmax is 0, so label-0 digits were 'certified'."""
    model = utils.select_model('mnist', 'relux')
    for p in model.parameters():
        p.data.fill_(math.nan)
    x, _ = _mnist_batch()
    y = torch.zeros(len(x), dtype=torch.long)
    assert model(x).argmax(1).eq(0).all()       # what fooled the old argmax rule
    assert not local_bound.certify(model, x, y, 0.1, AUTHORS.replace(sniter=2, opt_iter=2)).any()
    assert not local_bound.correct_predictions(model(x), y).any()


def test_a_nan_input_is_never_certified_nor_correct():
    model = _easy_model()
    x = torch.rand(8, 12)
    y = model(x).argmax(1).detach()
    assert local_bound.certify(model, x, y, 1e-4, AUTHORS.replace(sniter=50, opt_iter=50)).all()
    x[2, 7] = math.nan
    cert = local_bound.certify(model, x, y, 1e-4, AUTHORS.replace(sniter=50, opt_iter=50))
    assert not cert[2] and cert[torch.arange(8) != 2].all()
    assert not local_bound.correct_predictions(model(x), y)[2]


@pytest.mark.parametrize('eps', [math.nan, math.inf, -0.1])
def test_a_bad_eps_is_refused_in_one_line(eps):
    """A NaN radius would turn the translation into NaN, which the NaN -> 0 rule of docs/method.md §3 maps to 0:
    the clean logits would pass as worst-case ones. The pass refuses such an eps instead."""
    model = _easy_model()
    x = torch.rand(8, 12)
    y = model(x).argmax(1).detach()
    with pytest.raises(local_bound.BoundError, match='eps must be a finite number >= 0'):
        local_bound.certify(model, x, y, eps, AUTHORS.replace(sniter=5, opt_iter=5))


def test_a_clean_tie_is_neither_correct_nor_certified():
    model = _easy_model()
    with torch.no_grad():                      # classes 0 and 1 identical: z_0 == z_1 everywhere
        model[3].weight[1] = model[3].weight[0]
        model[3].bias[1] = model[3].bias[0]
        model[3].bias[0] += 50.0
        model[3].bias[1] += 50.0
    x = torch.rand(5, 12)
    y = torch.zeros(5, dtype=torch.long)
    logits = model(x)
    assert torch.equal(logits[:, 0], logits[:, 1]) and logits.argmax(1).eq(0).all()
    assert not local_bound.correct_predictions(logits, y).any()
    assert not local_bound.certify(model, x, y, 0.0, AUTHORS.replace(sniter=5, opt_iter=5)).any()


def test_worst_case_ties_and_margins_inside_rounding_do_not_certify():
    scores = torch.tensor([[3.0, 3.0, 1.0],                       # exact tie
                           [3.0, 3.0 - 1e-7, 1.0],                # inside the float32 margin
                           [3.0, 2.9, 1.0],                       # clear
                           [math.nan, 0.0, 1.0],                  # NaN own score
                           [3.0, math.inf, 1.0],                  # inf rival
                           [math.inf, 0.0, 1.0]])                 # inf own score
    y = torch.zeros(6, dtype=torch.long)
    rule = local_bound.strictly_first(scores, y, local_bound.MARGIN_RTOL)
    assert rule.tolist() == [False, False, True, False, False, False]


def test_gloro_bottom_tie_is_not_certified():
    logits = torch.tensor([[2.0, 1.0], [2.0, 1.0]])
    bottom = torch.tensor([[2.0], [1.5]])
    out = local_bound.BoundOutput(logits, torch.cat([logits, bottom], 1), torch.ones(2), torch.zeros(()))
    y = torch.zeros(2, dtype=torch.long)
    assert local_bound.certified_predictions(out, y).tolist() == [False, True]


def test_a_non_finite_lipschitz_product_is_not_certified():
    logits = torch.tensor([[2.0, 1.0], [2.0, 1.0]])
    out = local_bound.BoundOutput(logits, logits.clone(), torch.tensor([math.inf, 1.0]), torch.zeros(()))
    assert local_bound.certified_predictions(out, torch.zeros(2, dtype=torch.long)).tolist() == [False, True]


def test_a_model_ending_in_an_activation_is_refused_in_one_line():
    model = nn.Sequential(*utils.select_model('mnist', 'relux'), nn.ReLU())
    x, y = _mnist_batch(2)
    with pytest.raises(local_bound.BoundError, match='last module .* nn.Linear') as info:
        local_bound.certify(model, x, y, 0.1, AUTHORS.replace(sniter=2, opt_iter=2))
    assert '\n' not in str(info.value)


# ----------------------------------------------------------------------------- flags and checkpoints

def _parse(argv):
    return utils.argparser(argv=argv, data='mnist', model='relux', epochs=4, warmup=0, rampup=2,
                           epsilon=1.58, epsilon_train=1.58)


@pytest.mark.parametrize('argv, message', [
    (['--epsilon_train', 'nan'], '--epsilon_train must be a finite number'),
    (['--epsilon', 'inf'], '--epsilon must be a finite number'),
    (['--epsilon=-0.1'], '--epsilon must be in [0, 10000.0]'),
    (['--lr', '0'], '--lr must be > 0'),
    (['--lr=-1e-3'], '--lr must be > 0'),
    (['--end_lr', 'nan'], '--end_lr must be a finite number'),
    (['--kappa', '1.5'], '--kappa must be in [0, 1]'),
    (['--momentum', '1'], '--momentum must be in [0, 1)'),
    (['--init=-1'], '--init must be >= 0'),
    (['--alpha', '0'], '--alpha must be > 0'),
    (['--test_sniter', '0'], '--test_sniter must be at least 1'),
    (['--opt_iter', '0'], '--opt_iter must be at least 1'),
])
def test_bad_numbers_end_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        _parse(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err


def test_a_checkpoint_with_a_nan_tensor_is_refused_naming_it(tmp_path):
    model = utils.select_model('mnist', 'relux')
    state = model.state_dict()
    state['10.threshold'][0, 3] = math.nan
    path = tmp_path / 'bad_best.pth'
    torch.save({'state_dict': state, 'err': 0.5, 'epoch': 1}, path)
    with pytest.raises(checkpoints.CheckpointError, match=r'10\.threshold holds NaN') as info:
        checkpoints.load_model(str(path), 'mnist', 'relux')
    assert '\n' not in str(info.value)


def test_atomic_save_refuses_non_finite_values_and_keeps_the_old_file(tmp_path):
    path = str(tmp_path / 'x_checkpoint.pth')
    checkpoints.atomic_save({'state_dict': {'w': torch.ones(3)}}, path)
    with pytest.raises(checkpoints.NonFiniteError, match='w holds NaN'):
        checkpoints.atomic_save({'state_dict': {'w': torch.tensor([1.0, math.nan])}}, path)
    assert torch.load(path)['state_dict']['w'].eq(1).all()
    assert [p.name for p in tmp_path.iterdir()] == ['x_checkpoint.pth']


# ----------------------------------------------------------------------------- training stops

class PoisonedFromSecondEpoch(Dataset):
    """Random digits; example ``bad`` turns NaN once the whole set has been read once."""

    def __init__(self, images, labels, bad):
        self.images, self.labels, self.bad, self.served = images, labels, bad, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        self.served += 1
        x = self.images[index].clone()
        if index == self.bad and self.served > len(self):
            x[0, 10, 10] = math.nan
        return x, int(self.labels[index])


def _all_saved_tensors_finite(folder):
    for path in Path(folder).glob('*.pth'):
        assert checkpoints.first_non_finite(torch.load(path, weights_only=False)) is None, path


def test_a_nan_image_stops_training_and_resume_continues(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    images, labels = torch.rand(48, 1, 28, 28), torch.randint(0, 10, (48,))
    test = TensorDataset(torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    argv = ['--epochs', '3', '--rampup', '1', '--batch_size', '16', '--test_sniter', '3',
            '--test_opt_iter', '3', '--niter', '2', '--workers', '0', '--prefix', 'nan', '--verbose', '0',
            '--device', 'cpu']
    parse = functools.partial(_parse, argv)
    with pytest.raises(SystemExit) as info:
        trainer.main(parse, PoisonedFromSecondEpoch(images, labels, bad=7), test)
    assert info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: epoch 1, batch ')
    assert 'nan' in err.lower() and '--resume' in err
    _all_saved_tensors_finite(tmp_path / 'pretrained')
    saved = torch.load(tmp_path / 'pretrained' / 'nan_relux_checkpoint.pth', weights_only=False)
    assert saved['epoch'] == 0
    # the user fixes the data and resumes: epochs 1 and 2 run from the last good checkpoint
    report = trainer.main(functools.partial(_parse, argv + ['--resume']), TensorDataset(images, labels), test)
    assert math.isfinite(report['certified_err']) and report['best_epoch'] >= 1
    _all_saved_tensors_finite(tmp_path / 'pretrained')


def test_a_diverging_lr_stops_with_exit_status_3_and_no_nan_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    train = TensorDataset(torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    test = TensorDataset(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    argv = ['--epochs', '3', '--rampup', '1', '--batch_size', '16', '--lr', '1e30', '--test_sniter', '2',
            '--test_opt_iter', '2', '--workers', '0', '--prefix', 'big', '--verbose', '0', '--device', 'cpu']
    with pytest.raises(SystemExit) as info:
        trainer.main(functools.partial(_parse, argv), train, test)
    assert info.value.code == 3
    assert 'NaN or inf' in capsys.readouterr().err
    _all_saved_tensors_finite(tmp_path / 'pretrained')


def test_one_eps_per_sample_equals_one_pass_per_sample():
    """The radius search certifies every example at its own eps in one pass; that pass must give
    each example exactly what a pass at its eps alone gives (small layers: exact norms)."""
    model = _easy_model()
    x = torch.rand(4, 12)
    y = model(x).argmax(1).detach()
    eps = torch.tensor([0.0, 0.05, 0.2, 1.0])
    settings = AUTHORS.replace(sniter=500, opt_iter=1, method='precise', translation='exact')
    together = local_bound.bound_outputs(model, x, y, eps, settings)
    for i in range(4):
        alone = local_bound.bound_outputs(model, x[i:i + 1], y[i:i + 1], float(eps[i]), settings)
        torch.testing.assert_close(together.worst[i], alone.worst[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together.lipschitz[i], alone.lipschitz[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(local_bound.BoundError, match='one value per sample'):
        local_bound.certify(model, x, y, eps[:3])
