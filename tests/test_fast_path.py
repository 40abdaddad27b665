"""The fast path computes what the plain path computes (issue 4).

* ours (``local_bound.bound_outputs``) vs the authors' layout stand-in (``bench/authors_step.py``:
  separate clean forward, (mid, rad) box, five activation applications, pairwise translation):
  same clean and worst-case logits, same certified sets, same gradients;
* label-column vs pairwise translation; ``power_grad`` final vs unrolled;
* the fused interval Functions against autograd (gradcheck in float64);
* the on-device loader covers every example once per epoch, also split over ranks.
"""
import copy
import os
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data_load
import interval_steps
import loaders
import local_bound as lb
import models
import ranks
import spectral
import trainer
import utils
from settings import AUTHORS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))
from authors_step import AuthorsBound, authors_bound  # noqa: E402

MODELS = [('mnist', 'relux'), ('cifar10', 'c6f2_relux'), ('cifar10', 'c6f2_clmaxmin'), ('cifar10', 'standrelu')]


pytestmark = pytest.mark.usefixtures('one_thread')


class FixedStarts:
    """A store handing out fixed start vectors (and keeping the final ones)."""

    def __init__(self, vectors):
        self.vectors, self.finals = vectors, None

    def __contains__(self, layer):
        return layer in self.vectors

    def gather(self, index, device, dtype=torch.float32):
        return {k: v.clone().to(device=device, dtype=dtype) for k, v in self.vectors.items()}

    def scatter(self, index, vectors):
        self.finals = {k: v.detach().clone() for k, v in vectors.items()}


def setup(data, name, batch=5, seed=0, trained_steps=0):
    """(model, x, y, eps, shared global vectors, start vectors) for a small fixed problem."""
    torch.manual_seed(seed)
    model = utils.select_model(data, name, 2.0)
    shape = data_load.input_shape(data)
    x = torch.rand(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    shapes = lb.affine_input_shapes(model, shape)
    globals_ = {i: torch.randn(1, *global_shape(model[i], s)) for i, s in shapes.items()}
    starts = {i: torch.randn(batch, *s) for i, s in shapes.items()}
    eps = 0.4 if data == 'mnist' else 0.08
    return model, x, y, eps, globals_, starts


def global_shape(layer, in_shape):
    """The persistent global vector of a Linear layer lives in its output space, a conv's in its input."""
    return (layer.out_features,) if isinstance(layer, torch.nn.Linear) else in_shape


def ours(model, x, y, eps, globals_, starts, **changes):
    """Our pass with the authors' settings (power iteration, clip-and-rescale) and ``changes``."""
    spectral.load_global_vectors(model, {i: v.clone() for i, v in globals_.items()})
    store = FixedStarts(starts)
    out = lb.bound_outputs(model, x, y, eps, AUTHORS.replace(**changes), store=store, index=torch.arange(len(y)))
    return out, store.finals


def authors(model, x, y, eps, globals_, starts, sniter, opt_iter, gloro=False):
    bound = AuthorsBound(model)
    bound.global_u = {i: v.clone() for i, v in globals_.items()}
    u_data = [starts[k].clone() if k in starts else None for k in range(len(model))]
    clean = model(x)
    logits, worst, u_data = authors_bound(bound, x, y, eps, u_data, sniter, opt_iter, gloro)
    return clean, logits, worst, {k: u for k, u in enumerate(u_data) if u is not None}


@pytest.mark.parametrize('data,name', MODELS)
@pytest.mark.parametrize('gloro', [False, True])
def test_ours_equals_authors_layout(data, name, gloro):
    model, x, y, eps, globals_, starts = setup(data, name)
    out, finals = ours(model, x, y, eps, globals_, starts, sniter=2, opt_iter=3, gloro=gloro)
    clean, logits, worst, u_data = authors(model, x, y, eps, globals_, starts, 2, 3, gloro)
    assert torch.allclose(out.logits, clean, atol=1e-5, rtol=1e-5)      # one forward = the clean forward
    assert torch.allclose(out.logits, logits, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out.worst, worst, atol=1e-5, rtol=1e-5), (out.worst - worst).abs().max()
    assert torch.equal(out.worst.argmax(1) == y, worst.argmax(1) == y)
    for k, u in finals.items():   # the vectors written back to the store
        assert torch.allclose(u, u_data[k], atol=1e-5), k


@pytest.mark.parametrize('data,name', MODELS[:3])
def test_certified_sets_equal_at_test_settings(data, name):
    """Certification (many power iterations, long clip-and-rescale) on a briefly pushed model."""
    model, x, y, eps, globals_, starts = setup(data, name, batch=8, seed=1)
    y = model(x).argmax(1)   # labels the model agrees with, so that some points certify
    small = eps / 4
    with torch.no_grad():
        out, _ = ours(model, x, y, small, globals_, starts, sniter=60, opt_iter=60)
        _, _, worst, _ = authors(model, x, y, small, globals_, starts, 60, 60)
    assert torch.allclose(out.worst, worst, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.worst.argmax(1) == y, worst.argmax(1) == y)


@pytest.mark.parametrize('data,name', MODELS)
def test_gradients_equal_authors_layout(data, name):
    model, x, y, eps, globals_, starts = setup(data, name)
    twin = copy.deepcopy(model)
    out, _ = ours(model, x, y, eps, globals_, starts, sniter=2, opt_iter=2)
    (F.cross_entropy(out.worst, y) + 0.5 * F.cross_entropy(out.logits, y)).backward()
    clean, _, worst, _ = authors(twin, x, y, eps, globals_, starts, 2, 2)
    (F.cross_entropy(worst, y) + 0.5 * F.cross_entropy(clean, y)).backward()
    for (key, p), q in zip(model.named_parameters(), twin.parameters()):
        scale = q.grad.norm().item() + 1e-8
        assert (p.grad - q.grad).norm().item() <= 1e-4 * scale, key


@pytest.mark.parametrize('opt_iter', [1, 4])
def test_label_translation_equals_pairwise(opt_iter):
    model, x, y, eps, globals_, starts = setup('cifar10', 'c6f2_relux')
    label, _ = ours(model, x, y, eps, globals_, starts, sniter=2, opt_iter=opt_iter)
    pair, _ = ours(model, x, y, eps, globals_, starts, sniter=2, opt_iter=opt_iter, layout='pairwise')
    assert torch.allclose(label.worst, pair.worst, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('data,name', MODELS[:3])
def test_power_grad_final_same_values(data, name):
    model, x, y, eps, globals_, starts = setup(data, name)
    unrolled, u1 = ours(model, x, y, eps, globals_, starts, sniter=3, opt_iter=2)
    final, u2 = ours(model, x, y, eps, globals_, starts, sniter=3, opt_iter=2, power_grad='final')
    assert torch.allclose(unrolled.worst, final.worst, atol=1e-6, rtol=1e-6)
    assert torch.allclose(unrolled.lipschitz, final.lipschitz, rtol=1e-6)
    for k in u1:
        assert torch.allclose(u1[k], u2[k], atol=1e-6)


@pytest.mark.parametrize('data,name', [('mnist', 'relux'), ('cifar10', 'c6f2_clmaxmin')])
def test_power_grad_final_gradient_at_converged_vectors(data, name):
    """From converged start vectors both gradients are the top singular pair's u v^T."""
    model, x, y, eps, globals_, starts = setup(data, name, batch=3)
    with torch.no_grad():   # converge the start vectors (Ritz vectors to 1e-6) and the global ones
        _, converged = ours(model, x, y, eps, globals_, starts, sniter=400, opt_iter=1, method='lanczos', tol=1e-6)
        global_converged = {i: v.clone() for i, v in spectral.global_vectors_state(model).items()}
    grads = {}
    for mode in ('unrolled', 'final'):
        model.zero_grad()
        out, _ = ours(model, x, y, eps, global_converged, converged, sniter=2, opt_iter=2, power_grad=mode)
        out.lipschitz.log().sum().backward()
        grads[mode] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for a, b in zip(grads['unrolled'], grads['final']):
        assert (a - b).norm() <= 2e-3 * (b.norm() + 1e-8)


def test_power_grad_final_weight_gradient_is_rayleigh_quotient():
    """Few iterations: 'final' differentiates exactly <v, D_out W D_in u> with u, v held fixed."""
    torch.manual_seed(3)
    for layer, shape in [(torch.nn.Conv2d(3, 5, 4, 2, 1), (3, 8, 8)), (torch.nn.Linear(12, 7), (12,))]:
        op = lb.make_operator(layer, shape)
        u0 = torch.randn(4, *shape)
        in_mask = (torch.rand(4, *shape) > 0.3).float()
        out_mask = (torch.rand(4, *op.out_shape) > 0.3).float()
        weights = torch.randn(4)
        sigma, _ = spectral.masked_spectral_norm(op, u0, in_mask, out_mask, 2, grad='final')
        (sigma * weights).sum().backward()
        got = layer.weight.grad.clone()
        layer.zero_grad()
        with torch.no_grad():
            u = u0
            for _ in range(2):
                out = op.linear(u * in_mask) * out_mask
                v = out / spectral.batch_norms(out).clamp(min=torch.finfo(out.dtype).tiny)
                back = op.adjoint(v) * in_mask
                u = back / spectral.batch_norms(back).clamp(min=torch.finfo(back.dtype).tiny)
        explicit = (v * (op.linear(u * in_mask) * out_mask)).flatten(1).sum(1)
        (explicit * weights).sum().backward()
        assert torch.allclose(explicit, sigma, rtol=1e-5)
        assert torch.allclose(got, layer.weight.grad, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- fused Functions

def _no_ties(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def test_fused_intersection_gradcheck():
    mid, rad = _no_ties(2, 3, 4, 4), _no_ties(2, 3, 4, 4).abs()
    centre, ball = _no_ties(2, 3, 4, 4), _no_ties(2, 3, 1, 1).abs()
    inputs = [t.requires_grad_() for t in (mid, rad, centre, ball)]
    assert torch.autograd.gradcheck(lambda *a: lb.BallBoxIntersection.apply(*a), inputs)


@pytest.mark.parametrize('with_theta', [True, False])
def test_fused_clip_step_gradcheck_and_values(with_theta):
    centre = _no_ties(3, 10)
    lower, upper = centre - _no_ties(3, 10).abs(), centre + _no_ties(3, 10).abs()
    radius = _no_ties(3).abs()
    theta = _no_ties(1, 10).abs() if with_theta else None
    args = [t.requires_grad_() for t in (lower, upper, centre, radius)] + [
        theta.requires_grad_() if with_theta else None]
    assert torch.autograd.gradcheck(lambda *a: lb.ClippedBallStep.apply(*a), args)
    act = (lambda t: models.relu_x(t, theta)) if with_theta else F.relu
    got = lb.ClippedBallStep.apply(*args)
    r = radius.view(-1, 1)
    want = (act(torch.maximum(lower, centre - r)), act(torch.minimum(upper, centre + r)), act(centre))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_pick_gradcheck_with_broadcast():
    a, b = _no_ties(2, 4, 3, 3).requires_grad_(), _no_ties(1, 4, 3, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, q: lb.larger(p, q), (a, b))
    assert torch.autograd.gradcheck(lambda p, q: lb.smaller(p, q), (a, b))


@pytest.mark.skipif(not os.environ.get('LOCALLIP_SLOW_TESTS'),
                    reason='torch.compile takes minutes on a small CPU: set LOCALLIP_SLOW_TESTS=1')
@pytest.mark.parametrize('data,name', [('mnist', 'relux'), ('mnist', 'standrelu')])
def test_compiled_kernels_same_values_and_gradients(data, name):
    model, x, y, eps, globals_, starts = setup(data, name)
    results = []
    for compiled in (False, True):
        with lb.compiled_kernels(compiled):
            model.zero_grad()
            out, _ = ours(model, x, y, eps, globals_, starts, sniter=2, opt_iter=2)
            F.cross_entropy(out.worst, y).backward()
        results.append((out.worst.detach(), [p.grad.clone() for p in model.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert torch.allclose(eager, compiled, atol=1e-5, rtol=1e-5)
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- on-device loader

class TinyVisionSet(torch.utils.data.Dataset):
    """A torchvision-like image set (``.data`` uint8 NHWC numpy, ``.targets`` list)."""

    def __init__(self, count, seed=0):
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
        self.targets = rng.integers(0, 10, size=count).tolist()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return torch.from_numpy(self.data[i]).permute(2, 0, 1).float() / 255, self.targets[i]


def loader_args(**changes):
    values = dict(data='cifar10', augmentation=True, normalization=False, shuffle=True, seed=5, batch_size=16,
                  test_batch_size=32, drop_last=False, workers=0, limit_train=None, limit_test=None, loader='auto')
    values.update(changes)
    return Namespace(**values)


def test_device_loader_covers_each_example_once_per_epoch():
    train_set, test_set = TinyVisionSet(70), TinyVisionSet(40, seed=1)
    train, test, owned, _ = loaders.build_loaders(loader_args(), ranks.Runtime(torch.device('cpu')),
                                                  train_set, test_set)
    assert isinstance(train, data_load.DeviceTensorLoader) and owned is None
    orders = []
    for epoch in range(2):
        loaders.set_loader_epoch(train, epoch, 5)
        seen = torch.cat([index for _, _, index in train])
        assert sorted(seen.tolist()) == list(range(70))
        orders.append(seen)
        for x, y, index in train:
            assert x.shape[1:] == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
            assert torch.equal(y, torch.as_tensor(train_set.targets)[index])
    assert not torch.equal(orders[0], orders[1])
    loaders.set_loader_epoch(train, 0, 5)   # the order is a function of (seed, epoch): exact resume
    assert torch.equal(torch.cat([index for _, _, index in train]), orders[0])
    x, _, index = next(iter(test))           # test set: in order, not augmented
    assert torch.equal(index, torch.arange(32))
    want = torch.from_numpy(test_set.data[:32]).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(x, want)


def test_device_loader_shards_cover_the_data_once():
    train_set = TinyVisionSet(70)
    seen = []
    for rank in range(3):
        runtime = ranks.Runtime(torch.device('cpu'), rank=rank, world_size=3)
        train, _, owned, _ = loaders.build_loaders(loader_args(), runtime, train_set, TinyVisionSet(9))
        indices = torch.cat([index for _, _, index in train])
        assert sorted(indices.tolist()) == sorted(owned.tolist())
        seen += indices.tolist()
    assert len(seen) == len(set(seen)) == 69   # 70 // 3 * 3: at most world_size - 1 left out


def test_loader_choice():
    cpu = ranks.Runtime(torch.device('cpu'))
    seam = torch.utils.data.TensorDataset(torch.rand(10, 3, 32, 32), torch.arange(10) % 10)
    assert not isinstance(loaders.build_loaders(loader_args(), cpu, seam, seam)[0], data_load.DeviceTensorLoader)
    subset = torch.utils.data.Subset(TinyVisionSet(30), range(5, 25))
    train = loaders.build_loaders(loader_args(), cpu, subset, TinyVisionSet(9))[0]
    assert isinstance(train, data_load.DeviceTensorLoader) and len(train.dataset) == 20
    torch_loader = loaders.build_loaders(loader_args(loader='torch'), cpu, TinyVisionSet(9), TinyVisionSet(9))[0]
    assert isinstance(torch_loader, torch.utils.data.DataLoader)
    with pytest.raises(ValueError):
        loaders.build_loaders(loader_args(loader='device'), cpu, seam, seam)


def test_augmentation_matches_torchvision_distribution():
    """Batched crop+flip: every output is a 4-pixel-padded crop of its image, flipped half the time."""
    images = torch.randint(1, 256, (400, 3, 8, 8), dtype=torch.uint8)
    out = data_load.random_crop_flip(images, 4, torch.Generator().manual_seed(0))
    flips = 0
    for image, crop in zip(images, out):
        padded = F.pad(image, (4, 4, 4, 4))
        matches = [(top, left, flip) for flip in (False, True) for top in range(9) for left in range(9)
                   if torch.equal((padded.flip(-1) if flip else padded)[:, top:top + 8, left:left + 8],
                                  crop)]
        assert matches
        flips += all(m[2] for m in matches)
    assert 160 < flips < 240


def test_store_dtype_defaults():
    args = Namespace(store_dtype='auto')
    assert trainer.store_dtype(args, ranks.Runtime(torch.device('cpu'))) == torch.float32
    assert trainer.store_dtype(Namespace(store_dtype='bfloat16'), ranks.Runtime(torch.device('cpu'))) == torch.bfloat16


def test_compiled_kernels_mode_is_scoped():
    """The compiled mode holds only inside its block, and comes back after an exception."""
    assert not interval_steps._compiling[0]
    with pytest.raises(RuntimeError):
        with lb.compiled_kernels(True):
            assert interval_steps._compiling[0]
            raise RuntimeError('inside')
    assert not interval_steps._compiling[0]
