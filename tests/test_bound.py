"""Numerical tests of the bound pass of local_bound.py (boxes, masks, local norms, worst-case logits,
soundness, gradients) against independent computations written from docs/method.md.

The reference side never calls the code under test: explicit matrices are built by applying the
layers to basis vectors, spectral norms come from ``torch.linalg.svdvals``, the last-layer problem is
solved exactly (KKT + bisection), and the ball/box pass of docs/method.md §2 is re-implemented in
``helpers.reference_pass``. Small float64 networks keep this exact and fast (CPU, under a minute).
The masked spectral norms themselves are tested in test_spectral.py, the last-layer translation in
test_last_layer.py and the per-example store in test_store.py.
The module runs torch single-threaded: on a loaded 2-core machine, intra-op threads make these
small convolutions up to ~100x slower (spinning OpenMP workers), single-threaded they take seconds.
"""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
import data_load
import local_bound as lb
import models
import spectral
import utils
from settings import AUTHORS, TRAINING
from utils import ClampGroupSort, Flatten, ReLU_x
from helpers import (DT, affine_layers, attack_margin, exact_translation, explicit_matrix, layer_outputs,
                     per_neuron_attack_points, propagate_records, random_thresholds, reference_pass, sample_ball,
                     small_conv_net, small_mlp, top_singular, twin_stores, _seed)


pytestmark = pytest.mark.usefixtures('one_thread')


# ============================================================================ independent helpers


def reference_worst(model, x, y, eps):
    """Worst-case logits from ``reference_pass`` and the exact last-layer solver."""
    last = list(model)[-1]
    rows = []
    with torch.no_grad():
        for b, ref in enumerate(reference_pass(model, x, eps)):
            z = last(ref['centre'])[0]
            lower = torch.clamp(ref['lower'] - ref['centre'], max=0)[0].numpy()
            upper = torch.clamp(ref['upper'] - ref['centre'], min=0)[0].numpy()
            radius = eps * ref['local_product']
            yb = int(y[b])
            worst = z.clone()
            for j in range(z.numel()):
                if j != yb:
                    w = (last.weight[j] - last.weight[yb]).numpy()
                    worst[j] = z[j] + exact_translation(w, lower, upper, radius)
            rows.append(worst)
    return torch.stack(rows)


# ============================================================================ small networks


def scaled_tiny_8c(kind, seed=0):
    """The 8C2F TinyImageNet architecture with 1/8 of the channels on 32x32 inputs."""
    _seed(seed)
    convs = [(3, 8, 3, 1, 1), (8, 8, 3, 1, 1), (8, 8, 4, 2, 0), (8, 16, 3, 1, 1),
             (16, 16, 3, 1, 1), (16, 16, 4, 2, 0), (16, 32, 3, 1, 1), (32, 32, 4, 2, 0)]
    act = models.relux_activation(1.0) if kind == 'relux' else models.maxmin_activation(models.TINY_8C_MAXMIN)
    return models.build_sequential((3, 32, 32), convs, [32, 20], act)


def code_pass(model, x, eps, sniter):
    """Run the code's rules layer by layer; returns [(lower, upper, mask)] after every layer and the state."""
    options = lb.PassOptions(AUTHORS.replace(sniter=sniter))
    state = lb.BoundState(x, torch.full((x.size(0),), float(eps), dtype=x.dtype), x - eps, x + eps)
    trace = []
    for idx, layer in enumerate(list(model)[:-1]):
        state = lb.rule_for(layer)(layer, idx, state, options)
        trace.append((state.lower, state.upper, state.mask))
    return trace, state


# ============================================================================ 1. local <= global

@pytest.mark.parametrize('key', list(models.MODELS), ids=lambda k: f'{k[0]}-{k[1]}')
def test_local_below_global_real_models(key):
    """Every model of docs/method.md §1 (random init, random inputs): local <= global per sample.

    Both are power-iteration estimates (lower bounds of the true norms); the true local/global ratio
    of these models at these radii is about 0.5-0.9, far beyond the estimates' error.
    """
    data, name = key
    _seed(4)
    model = utils.select_model(data, name, 2.0)
    x = torch.rand(2, *data_load.input_shape(data))
    tiny = data == 'tinyimagenet'
    glob = lb.global_lipschitz(model, sniter=50 if tiny else 300)
    local = lb.local_lipschitz(model, x, 0.16 if tiny else 36 / 255, AUTHORS.replace(sniter=10 if tiny else 100))
    assert local.shape == (2,)
    assert torch.all(local > 0)
    assert torch.all(local <= glob * (1 + 1e-4)), f'local {local.tolist()} > global {glob}'
    assert torch.all(local < glob * 0.99), 'no fixed neurons at all: the masks are not applied?'


@pytest.mark.parametrize('kind', ['relux', 'maxmin'])
def test_local_below_global_scaled_tiny_8c(kind):
    model = scaled_tiny_8c(kind)
    x = torch.rand(2, 3, 32, 32)
    glob = lb.global_lipschitz(model, sniter=150, input_shape=(3, 32, 32))
    local = lb.local_lipschitz(model, x, 0.16, AUTHORS.replace(sniter=30))
    assert torch.all(local > 0)
    assert torch.all(local <= glob * (1 + 1e-4)), f'local {local.tolist()} > global {glob}'


@pytest.mark.parametrize('kind', ['relux', 'relu', 'maxmin'])
def test_local_below_global_briefly_trained(kind):
    """A few Adam steps of the robust loss, then local <= global (global also from exact SVDs)."""
    model = small_conv_net(kind, seed=5, dtype=torch.float32)
    x = torch.rand(32, 2, 7, 7)
    y = torch.randint(0, 4, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(8):
        loss = F.cross_entropy(lb.worst_case_logits(model, x, y, 0.3, TRAINING), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lb.project_parameters(model)
    model = copy.deepcopy(model).double()      # new layer objects: no float32 warm-start vectors
    ref = reference_pass(model, x[:4].double(), 0.3)
    exact_global = math.prod(ref[0]['global_sigma'].values())
    local = lb.local_lipschitz(model, x[:4].double(), 0.3, AUTHORS.replace(sniter=2000))
    for b in range(4):
        assert float(local[b]) <= exact_global * (1 + 1e-4)
        assert float(local[b]) == pytest.approx(ref[b]['local_product'], rel=1e-3), f'sample {b}'


@pytest.mark.parametrize('kind', ['relu', 'relux'])
def test_huge_eps_local_equals_global(kind):
    """With eps huge every neuron varies, so the masked norms are the plain norms."""
    model = small_conv_net(kind, seed=6)
    x = torch.rand(3, 2, 7, 7, dtype=DT)
    state = lb.propagate(model, x, 1e4, AUTHORS.replace(sniter=3000))
    for rec in state.records:
        for mask in (rec.in_mask, rec.out_mask):
            assert mask is None or bool(torch.all(mask == 1)), f'layer {rec.index}: fixed neurons at eps=1e4'
    local = lb.local_lipschitz(model, x, 1e4, AUTHORS.replace(sniter=3000))
    exact = math.prod(top_singular(explicit_matrix(layer, shape)) for layer, shape in affine_layers(model, (2, 7, 7)))
    for b in range(3):
        assert float(local[b]) == pytest.approx(exact, rel=1e-2)
    # global_lipschitz needs a float32 model (see test_global_lipschitz_accepts_float64_model).
    model32 = small_conv_net(kind, seed=6, dtype=torch.float32)
    glob = lb.global_lipschitz(model32, sniter=3000, input_shape=(2, 7, 7))
    local32 = lb.local_lipschitz(model32, x.float(), 1e4, AUTHORS.replace(sniter=3000))
    assert glob == pytest.approx(exact, rel=1e-3)
    for b in range(3):
        assert float(local32[b]) == pytest.approx(glob, rel=1e-2)


# ============================================================================ end-to-end against the reference

@pytest.mark.parametrize('kind', ['relux', 'relu', 'maxmin'])
def test_worst_case_logits_match_reference(kind):
    """Boxes, masks, local norms and worst-case logits equal the independent implementation of docs/method.md."""
    model = small_conv_net(kind, seed=14)
    x = torch.rand(3, 2, 7, 7, dtype=DT)
    y = torch.tensor([1, 0, 3])
    eps = 0.15
    refs = reference_pass(model, x, eps)
    trace, state = code_pass(model, x, eps, sniter=3000)
    recs = propagate_records(model, x, eps)
    for b, ref in enumerate(refs):
        for k, ((lo, up, _), (rlo, rup)) in enumerate(zip(trace, ref['boxes'])):
            # atol: the code's global norms come from power iteration (~1e-8 relative error)
            torch.testing.assert_close(lo[b:b + 1], rlo, rtol=1e-6, atol=1e-7, msg=f'lower, layer {k}')
            torch.testing.assert_close(up[b:b + 1], rup, rtol=1e-6, atol=1e-7, msg=f'upper, layer {k}')
        for k, mask in ref['masks'].items():
            assert torch.equal(trace[k][2][b:b + 1], mask), f'sample {b}: mask of activation {k} differs'
        for rec, (idx, _, in_mask, out_mask) in zip(recs, ref['affine']):
            assert rec.index == idx
            for got, want in ((rec.in_mask, in_mask), (rec.out_mask, out_mask)):
                assert (got is None) == (want is None), f'layer {idx}: mask presence differs'
                if got is not None:
                    assert torch.equal(got[b:b + 1].reshape(want.shape), want), f'layer {idx} mask'
    fixed = sum(float((1 - m).sum()) for ref in refs for m in ref['masks'].values())
    varying = sum(float(m.sum()) for ref in refs for m in ref['masks'].values())
    assert fixed > 0 and varying > 0, 'vacuous: choose eps so that masks are mixed'
    out = lb.bound_outputs(model, x, y, eps, AUTHORS.replace(sniter=3000, opt_iter=1000))
    # The local power iteration stops once u moves < 1e-3 (docs/method.md §2), so its norms are ~1e-4 accurate.
    for b, ref in enumerate(refs):
        assert float(out.lipschitz[b].detach()) == pytest.approx(ref['local_product'], rel=1e-3)
        assert ref['local_product'] < math.prod(ref['global_sigma'].values())
    torch.testing.assert_close(out.logits, model(x))
    worst_ref = reference_worst(model, x, y, eps)
    torch.testing.assert_close(out.worst - out.logits, worst_ref - out.logits, rtol=2e-3, atol=1e-8)
    assert torch.all(out.worst >= worst_ref - 2e-3 * (worst_ref - out.logits).abs() - 1e-8)


# ============================================================================ 2. masks by sampling


def directed_points(model, x, eps):
    """x +- eps * row/|row| for every neuron of the first layer (these reach the first box's ball bounds)."""
    first = list(model)[0] if not isinstance(list(model)[0], Flatten) else list(model)[1]
    mat = explicit_matrix(first, tuple(x.shape[1:]) if isinstance(first, nn.Conv2d) else (x[0].numel(),))
    rows = mat / mat.norm(dim=1, keepdim=True)
    pts = torch.cat([rows, -rows]) * eps
    return x.unsqueeze(1) + pts.view(1, -1, *x.shape[1:])


def record_masks(model, x, eps, sniter):
    """{activation index: 0/1 varying mask shaped like that activation's output}, read from
    ``propagate(...).records``: ReLU family -> out_mask of the affine layer before the activation;
    MaxMin -> in_mask of the next affine layer (the final state's mask for the last activation)."""
    state = lb.propagate(model, x, eps, AUTHORS.replace(sniter=sniter))
    layers = list(model)[:-1]
    records = {rec.index: rec for rec in state.records}
    shapes = [tuple(t.shape) for t in layer_outputs(model, x)]
    masks = {}
    for k, layer in enumerate(layers):
        if isinstance(layer, (ReLU_x, nn.ReLU)):
            masks[k] = records[max(i for i in records if i < k)].out_mask
        elif isinstance(layer, ClampGroupSort):
            later = [i for i in records if i > k]
            masks[k] = records[min(later)].in_mask if later else state.mask
        else:
            continue
        assert masks[k] is not None and masks[k].numel() == math.prod(shapes[k]), f'activation {k}: mask shape'
        masks[k] = masks[k].reshape(shapes[k])
    return masks


def check_points_against_pass(model, x, trace, masks, points, tol=1e-9):
    """Every layer output of ``points`` [B, n, *shape] lies in the code's box, and every fixed neuron
    keeps its state. Returns (fixed, varying) neuron counts."""
    layers = list(model)[:-1]
    n_fixed = n_varying = 0
    for b in range(x.size(0)):
        outs = layer_outputs(model, points[b])
        for k, layer in enumerate(layers):
            lower, upper = trace[k][0][b].detach(), trace[k][1][b].detach()
            slack = tol * (1 + float(upper.abs().max()))
            assert torch.all(outs[k] >= lower - slack), f'input {b}: a point below the box after layer {k}'
            assert torch.all(outs[k] <= upper + slack), f'input {b}: a point above the box after layer {k}'
            if k not in masks:
                continue
            fixed = masks[k][b] == 0
            n_fixed += int(fixed.sum())
            n_varying += int((~fixed).sum())
            pre = outs[k - 1]
            if isinstance(layer, ReLU_x):
                theta = layer.threshold[0].detach()
                stays = (pre <= 0).all(0) | (pre > theta).all(0)
                assert not (fixed & ~stays).any(), f'ReLU_x {k}: {int((fixed & ~stays).sum())} fixed neurons change state'
            elif isinstance(layer, nn.ReLU):
                stays = (pre <= 0).all(0)
                assert not (fixed & ~stays).any(), f'ReLU {k}: {int((fixed & ~stays).sum())} fixed neurons become active'
            else:
                half = outs[k].size(1) // 2
                high, low = outs[k][:, :half], outs[k][:, half:]
                assert not (fixed[:half] & ~(high == layer.max[0].detach()).all(0)).any(), f'MaxMin {k}: max half moves'
                assert not (fixed[half:] & ~(low == layer.min[0].detach()).all(0)).any(), f'MaxMin {k}: min half moves'
    return n_fixed, n_varying


def mask_test_net(net):
    arch, kind = net.split('-')
    if arch == 'conv':
        return small_conv_net(kind, seed=20), (2, 7, 7), kind
    return random_thresholds(small_mlp(kind, seed=20), 0.05, 0.3), (10,), kind


@pytest.mark.parametrize('net', ['conv-relux', 'conv-relu', 'conv-maxmin', 'mlp-relux', 'mlp-relu', 'mlp-maxmin'])
def test_fixed_neurons_never_change_state_in_the_ball(net):
    """Thousands of random points (a third on the sphere) and per-neuron PGD points of every layer:
    each layer output stays in the propagated box and no fixed neuron changes its state."""
    model, shape, kind = mask_test_net(net)
    _seed(21)
    x = 0.2 + 0.6 * torch.rand(3, *shape, dtype=DT)
    eps = 0.25
    masks = record_masks(model, x, eps, sniter=3000)
    trace, _ = code_pass(model, x, eps, sniter=3000)
    gen = torch.Generator().manual_seed(22)
    attacks = []
    for b in range(x.size(0)):
        pts = [per_neuron_attack_points(model, x[b], eps, k, gen)
               for k, layer in enumerate(list(model)[:-1])
               if isinstance(layer, (nn.Conv2d, nn.Linear, ClampGroupSort))]
        attacks.append(torch.cat(pts))
    points = torch.cat([sample_ball(x, eps, 4000, gen), directed_points(model, x, eps),
                        torch.stack(attacks), x.unsqueeze(1)], dim=1)
    n_fixed, n_varying = check_points_against_pass(model, x, trace, masks, points)
    assert n_fixed > 0 and n_varying > 0, f'vacuous mask test ({n_fixed} fixed, {n_varying} varying)'
    layers = list(model)[:-1]
    if kind == 'relux':   # both kinds of fixed ReLU_x neurons occur
        sat = sum(int(((trace[k - 1][0] > l.threshold) & (masks[k] == 0)).sum())
                  for k, l in enumerate(layers) if isinstance(l, ReLU_x))
        dead = sum(int(((trace[k - 1][1] <= 0) & (masks[k] == 0)).sum())
                   for k, l in enumerate(layers) if isinstance(l, ReLU_x))
        assert sat > 0 and dead > 0, f'vacuous: {sat} saturated, {dead} dead'
    if kind == 'maxmin':  # both halves have fixed units
        high = sum(int((m[:, :m.size(1) // 2] == 0).sum()) for m in masks.values())
        low = sum(int((m[:, m.size(1) // 2:] == 0).sum()) for m in masks.values())
        assert high > 0 and low > 0, f'vacuous: {high} fixed max-half, {low} fixed min-half units'


@pytest.mark.parametrize('key', [('mnist', 'relux'), ('cifar10', 'c6f2_clmaxmin'), ('cifar10', 'standrelu')],
                         ids=lambda k: f'{k[0]}-{k[1]}')
def test_real_model_boxes_and_masks_hold_on_samples(key):
    data, name = key
    _seed(24)
    model = utils.select_model(data, name, 0.3)
    random_thresholds(model, 0.05, 0.5)
    x = 0.2 + 0.6 * torch.rand(1, *data_load.input_shape(data))
    eps = 0.5
    masks = record_masks(model, x, eps, sniter=300)
    trace, _ = code_pass(model, x, eps, sniter=300)
    gen = torch.Generator().manual_seed(25)
    points = torch.cat([sample_ball(x, eps, 300, gen), x.unsqueeze(1)], dim=1)
    n_fixed, n_varying = check_points_against_pass(model, x, trace, masks, points, tol=1e-5)
    assert n_fixed > 0 and n_varying > 0, f'vacuous ({n_fixed} fixed, {n_varying} varying)'


def test_first_layer_box_is_tight_on_the_ball():
    """The ball bound m_j +- eps |W_j| of the first (linear) layer is attained at x +- eps W_j/|W_j|."""
    model = small_mlp('relux', seed=23)
    x = 0.2 + 0.6 * torch.rand(2, 10, dtype=DT)
    eps = 0.1
    trace, _ = code_pass(model, x, eps, sniter=3000)
    lower, upper = trace[1][0], trace[1][1]      # after Flatten, Linear
    pts = directed_points(model, x, eps)
    for b in range(2):
        pre = layer_outputs(model, pts[b])[1]
        torch.testing.assert_close(pre.max(0).values, upper[b], rtol=0, atol=1e-12)
        torch.testing.assert_close(pre.min(0).values, lower[b], rtol=0, atol=1e-12)


# ============================================================================ 3. soundness

@pytest.mark.parametrize('kind', ['relux', 'relu', 'maxmin'])
def test_worst_case_logits_bound_sampled_and_attacked_margins(kind):
    model = small_conv_net(kind, seed=30)
    _seed(31)
    x = 0.2 + 0.6 * torch.rand(3, 2, 7, 7, dtype=DT)
    eps = 0.2
    with torch.no_grad():
        y = model(x).argmax(1)
    worst = lb.worst_case_logits(model, x, y, eps, AUTHORS.replace(sniter=500, opt_iter=1000)).detach()
    bound = worst - worst.gather(1, y[:, None])                     # worst[j] - worst[y]
    gen = torch.Generator().manual_seed(32)
    samples = sample_ball(x, eps, 4000, gen)
    for b in range(3):
        with torch.no_grad():
            z = model(samples[b])
        margin = z - z[:, y[b]:y[b] + 1]
        assert torch.all(margin <= bound[b] + 1e-5), f'sampled margin above the bound (sample {b})'
        # Projected gradient ascent on each margin z_j - z_y, from several starts.
        for j in range(z.size(1)):
            if j == int(y[b]):
                continue
            best = attack_margin(model, x[b], int(y[b]), j, eps, gen)
            assert best <= float(bound[b, j]) + 1e-5, f'attacked margin {best} > bound {float(bound[b, j])}'


def synthetic_problem(n_per_class=20, classes=3, seed=40):
    gen = torch.Generator().manual_seed(seed)
    protos = 0.2 + 0.6 * (torch.rand(classes, 1, 6, 6, generator=gen) < 0.5).to(torch.float32)
    x = torch.cat([protos[c] + 0.03 * torch.randn(n_per_class, 1, 6, 6, generator=gen) for c in range(classes)])
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return x.clamp(0.05, 0.95), y


def robust_tiny_net(kind='relux', seed=41):
    _seed(seed)
    if kind == 'relux':
        act = lambda shape: ReLU_x(shape, 1.0)  # noqa: E731
    else:
        act = lambda shape: nn.ReLU()  # noqa: E731
    model = nn.Sequential(nn.Conv2d(1, 4, 3, 1, 1), act([1, 4, 6, 6]), nn.Conv2d(4, 4, 4, 2, 1), act([1, 4, 3, 3]),
                          Flatten(), nn.Linear(36, 16), act([1, 16]), nn.Linear(16, 3))
    models.init_conv_weights(model)
    return model


@pytest.fixture(scope='module')
def trained():
    """A tiny ReLU_x net trained with the robust loss on a separable synthetic problem."""
    x, y = synthetic_problem()
    model = robust_tiny_net()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for step in range(60):
        eps = min(0.4, 0.4 * step / 30)
        loss = F.cross_entropy(lb.worst_case_logits(model, x, y, eps, TRAINING), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lb.project_parameters(model)
    model.eval()
    return model, x, y


def test_pgd_never_breaks_a_certified_point(trained):
    model, x, y = trained
    eps = 0.6
    cert = lb.certify(model, x, y, eps, AUTHORS.replace(sniter=500, opt_iter=1000))
    assert cert.dtype == torch.bool and cert.shape == y.shape
    assert int(cert.sum()) >= 1, 'vacuous: nothing certified'
    with torch.no_grad():
        assert torch.all(model(x)[cert].argmax(1) == y[cert]), 'a certified point is misclassified'
    adv = attacks.pgd(model, x, y, eps, norm=2, steps=50, step_size=eps / 4, restarts=3, clip=None)
    assert torch.all((adv - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5))
    with torch.no_grad():
        broken = model(adv).argmax(1) != y
    assert not (broken & cert).any(), f'{int((broken & cert).sum())} certified points broken by PGD'
    # Soundness of the worst-case logits on the attacked points as well.
    worst = lb.worst_case_logits(model, x, y, eps, AUTHORS.replace(sniter=500, opt_iter=1000)).detach()
    with torch.no_grad():
        z = model(adv)
    assert torch.all(z - z.gather(1, y[:, None]) <= worst - worst.gather(1, y[:, None]) + 1e-5)


# ============================================================================ 4. gloro

@pytest.mark.parametrize('eps', [0.002, 0.2])
def test_gloro_logits(eps):
    """[z, max_{j != y} z~_j]; at the small eps the bottom logit lies below z_y (certified points)."""
    model = small_conv_net('relux', seed=50, dtype=torch.float32)
    _seed(51)
    x = torch.rand(8, 2, 7, 7)
    with torch.no_grad():
        clean = model(x)
    y = clean.argmax(1)
    y[:2] = (y[:2] + 1) % 4                   # two misclassified points as well
    lb.global_lipschitz(model, sniter=3000, input_shape=(2, 7, 7))
    s1, s2 = twin_stores(model, (2, 7, 7), 8)
    index = torch.arange(8)
    settings = AUTHORS.replace(sniter=200, opt_iter=1000)
    plain = lb.worst_case_logits(model, x, y, eps, settings, store=s1, index=index).detach()
    gl = lb.worst_case_logits(model, x, y, eps, settings.replace(gloro=True), store=s2, index=index).detach()
    assert gl.shape == (8, 5)
    torch.testing.assert_close(gl[:, :4], clean)
    others = plain.clone()
    others[torch.arange(8), y] = -float('inf')
    bottom = others.max(1).values
    torch.testing.assert_close(gl[:, 4], bottom, rtol=1e-5, atol=1e-6)
    if eps < 0.01:
        assert (bottom < clean[torch.arange(8), y]).any(), 'vacuous: no point has its bottom logit below z_y'
    # gloro's prediction is y exactly where the non-gloro worst-case logits certify.
    torch.testing.assert_close(gl.argmax(1) == y, plain.argmax(1) == y)
    torch.testing.assert_close(plain[torch.arange(8), y], clean[torch.arange(8), y])


# ============================================================================ 5. global-bound option

def test_global_bound_option(trained):
    model, x, y = trained
    eps = 0.6
    glob = lb.global_lipschitz(model, sniter=3000, input_shape=(1, 6, 6))
    exact = math.prod(top_singular(explicit_matrix(l, s)) for l, s in affine_layers(model, (1, 6, 6)))
    assert glob == pytest.approx(exact, rel=1e-4)
    with torch.no_grad():
        out = lb.bound_outputs(model, x, y, eps, AUTHORS.replace(sniter=500, opt_iter=1000, bound='global'))
        local = lb.bound_outputs(model, x, y, eps, AUTHORS.replace(sniter=500, opt_iter=1000, bound='local'))
    torch.testing.assert_close(out.lipschitz, torch.full_like(out.lipschitz, glob), rtol=1e-4, atol=0)
    assert torch.all(local.lipschitz <= out.lipschitz * (1 + 1e-4))
    # A larger radius can only raise the worst-case logits of the other classes.
    assert torch.all(out.worst >= local.worst - 1e-5)
    strict = 0
    for radius in (0.3, 0.5, 0.6, 0.7, 0.8):
        cert_local = lb.certify(model, x, y, radius, AUTHORS.replace(sniter=500, opt_iter=1000, bound='local'))
        cert_global = lb.certify(model, x, y, radius, AUTHORS.replace(sniter=500, opt_iter=1000, bound='global'))
        assert not (cert_global & ~cert_local).any(), f'eps {radius}: global certifies a point that local does not'
        strict += int(cert_local.sum()) > int(cert_global.sum())
    assert strict > 0, 'vacuous: local never certifies more than global'
    with pytest.raises(ValueError):
        lb.bound_outputs(model, x, y, eps, AUTHORS.replace(sniter=1, opt_iter=1, bound='nope'))


# ============================================================================ 6. gradients

@pytest.mark.parametrize('kind', ['relux', 'relu', 'maxmin'])
@pytest.mark.parametrize('eps', [0.0, 0.2])
@pytest.mark.parametrize('gloro', [False, True])
def test_gradients_finite_for_every_parameter(kind, eps, gloro):
    model = small_conv_net(kind, seed=70, dtype=torch.float32)
    _seed(71)
    x = torch.rand(6, 2, 7, 7)
    y = torch.randint(0, 4, (6,))
    store = lb.SingularVectorStore(model, (2, 7, 7), 6, seed=2)
    out = lb.worst_case_logits(model, x, y, eps, TRAINING.replace(sniter=2, opt_iter=2, gloro=gloro), store=store,
                               index=torch.arange(6))
    assert torch.isfinite(out).all()
    loss = F.cross_entropy(out, y)
    model.zero_grad()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f'{name}: no gradient'
        assert torch.isfinite(p.grad).all(), f'{name}: non-finite gradient (eps={eps})'
    if eps > 0 and kind != 'relu':
        extra = [p for n, p in model.named_parameters() if n.endswith(('threshold', 'max', 'min'))]
        assert sum(float(p.grad.abs().sum()) for p in extra) > 0, 'activation parameters get no gradient'


def _loss_with_fixed_starts(model, x, y, eps, gloro, global_start=None):
    """Robust CE with the same random start vectors at every call: a deterministic function of the
    parameters. ``global_start``: reset the global power-iteration vectors first and use one
    iteration (unconverged global norms, so the activation's ball box can be the tighter one)."""
    torch.manual_seed(7)
    sniter = 20
    if global_start is not None:
        spectral.load_global_vectors(model, global_start)
        sniter = 1
    worst = lb.worst_case_logits(model, x, y, eps, AUTHORS.replace(sniter=sniter, opt_iter=1000, gloro=gloro))
    return F.cross_entropy(worst, y)


@pytest.mark.parametrize('net', ['mlp-relux', 'mlp-relu', 'mlp-maxmin', 'conv-relux', 'conv-maxmin'])
@pytest.mark.parametrize('mode', ['converged', 'gloro', 'cold-global'])
def test_worst_case_loss_gradient_matches_finite_differences(net, mode):
    """d loss / d parameters (all of them, thresholds included) against central differences, float64.

    Start vectors are re-drawn from the same seed at every evaluation and the global vectors are
    either converged first or reset to the same start, so the loss is a deterministic, piecewise
    smooth function of the parameters.
    """
    arch, kind = net.split('-')
    if arch == 'mlp':
        model, shape = random_thresholds(small_mlp(kind, seed=90), 0.05, 0.3), (10,)
    else:
        model, shape = small_conv_net(kind, seed=90), (2, 7, 7)
    _seed(91)
    x = 0.2 + 0.6 * torch.rand(4, *shape, dtype=DT)
    y = torch.tensor([0, 1, 2, 0]) % list(model)[-1].out_features
    eps = 0.2
    gloro = mode == 'gloro'
    global_start = None
    if mode == 'cold-global':
        global_start = {i: torch.randn(1, *((l.out_features,) if isinstance(l, nn.Linear) else s), dtype=DT)
                        for i, (l, s) in zip([i for i, l in enumerate(model) if isinstance(l, (nn.Conv2d, nn.Linear))],
                                             affine_layers(model, shape))}
    else:
        lb.propagate(model, x, eps, AUTHORS.replace(sniter=5000))          # converge the global vectors
    params = [p for p in model.parameters()]
    loss = _loss_with_fixed_starts(model, x, y, eps, gloro, global_start)
    grads = torch.autograd.grad(loss, params)
    gen = torch.Generator().manual_seed(92)
    for trial in range(3):
        direction = [torch.randn(p.shape, generator=gen, dtype=DT) * (p.detach().abs().mean() + 1e-2)
                     for p in params]
        h = 1e-4      # the converged loss carries ~1e-11 noise (warm-started global power iteration)
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.add_(sign * h * d)
                values.append(float(_loss_with_fixed_starts(model, x, y, eps, gloro, global_start)))
                for p, d in zip(params, direction):
                    p.sub_(sign * h * d)
        numeric = (values[0] - values[1]) / (2 * h)
        analytic = float(sum((g * d).sum() for g, d in zip(grads, direction)))
        assert analytic == pytest.approx(numeric, rel=2e-3, abs=1e-6), f'direction {trial}'
    for (name, _), g in zip(model.named_parameters(), grads):
        assert torch.isfinite(g).all(), name


def _reference_activation_box(layer, lower, upper, centre, radius):
    """docs/method.md §2: box = [max(act(l), act(m - r)), min(act(u), act(m + r))], centre act(m), plain torch ops."""
    r = radius.view(-1, *([1] * (centre.dim() - 1)))
    if isinstance(layer, ReLU_x):
        act = lambda t: torch.clamp(torch.minimum(t, layer.threshold), min=0.0)  # noqa: E731
    elif isinstance(layer, nn.ReLU):
        act = torch.relu
    else:
        def act(t):
            a, b = t.chunk(2, dim=1)
            return torch.cat([torch.minimum(torch.maximum(a, b), layer.max),
                              torch.maximum(torch.minimum(a, b), layer.min)], dim=1)
    return (torch.maximum(act(lower), act(centre - r)), torch.minimum(act(upper), act(centre + r)), act(centre))


@pytest.mark.parametrize('kind', ['relux', 'relu', 'maxmin'])
@pytest.mark.parametrize('shape', [(6, 3, 3), (10,)], ids=['conv', 'flat'])
def test_activation_rule_values_and_gradients_on_handmade_states(kind, shape):
    """The activation rules on states where sometimes the box and sometimes the ball binds (in a
    real pass the affine rule's per-row ball bound makes the activation's ball box redundant):
    values, masks and gradients w.r.t. box, centre, radius and the activation's parameters."""
    gen = torch.Generator().manual_seed(100)
    batch = 5
    half = [1, shape[0] // 2, *shape[1:]]
    if kind == 'relux':
        layer = ReLU_x([1, *shape]).to(DT)
        with torch.no_grad():
            layer.threshold.copy_(torch.rand(1, *shape, generator=gen, dtype=DT) * 0.8 + 0.1)
    elif kind == 'relu':
        layer = nn.ReLU()
    else:
        layer = ClampGroupSort(half, 0.3, -0.3).to(DT)
        with torch.no_grad():
            layer.max.copy_(0.1 + 0.5 * torch.rand(half, generator=gen, dtype=DT))
            layer.min.copy_(-0.1 - 0.5 * torch.rand(half, generator=gen, dtype=DT))
    centre = torch.randn(batch, *shape, generator=gen, dtype=DT) * 0.6
    below = torch.rand(batch, *shape, generator=gen, dtype=DT) * 0.8
    above = torch.rand(batch, *shape, generator=gen, dtype=DT) * 0.8
    radius = torch.rand(batch, generator=gen, dtype=DT) * 0.6 + 0.05
    leaves = [t.clone().requires_grad_(True) for t in (centre - below, centre + above, centre, radius)]
    lower, upper, centre_, radius_ = leaves
    # the rules read only the recorded operator's output shape (to shape its out_mask)
    record = lb.AffineRecord(0, SimpleNamespace(out_shape=shape), torch.tensor(1.0, dtype=DT))
    state = lb.BoundState(centre_, radius_, lower, upper, None, [record], owner=record)
    new = lb.rule_for(layer)(layer, 1, state, lb.PassOptions(TRAINING))
    ref = _reference_activation_box(layer, lower, upper, centre_, radius_)
    ball_binds = ((centre_ - radius_.view(-1, *([1] * len(shape)))) > lower).float().mean()
    assert 0.1 < float(ball_binds) < 0.9, 'test states should mix binding ball and binding box'
    for got, want, name in zip((new.lower, new.upper, new.centre), ref, ('lower', 'upper', 'centre')):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
    # masks (docs/method.md §2), from the pre-activation box (ReLU family) or the output box (MaxMin)
    if kind == 'relux':
        want_mask = ((lower <= layer.threshold) & (upper > 0))
        assert torch.equal(record.out_mask.bool(), want_mask)
    elif kind == 'relu':
        assert torch.equal(record.out_mask.bool(), upper > 0)
    else:
        k = shape[0] // 2
        want_mask = torch.cat([ref[0][:, :k] < layer.max, ref[1][:, k:] > layer.min], dim=1)
        assert torch.equal(new.mask.bool(), want_mask)
        assert record.out_mask is None
    if kind != 'maxmin':
        assert torch.equal(new.mask, record.out_mask)
    # gradients of a random functional of (lower, upper, centre)
    weights = [torch.randn(t.shape, generator=gen, dtype=DT) for t in ref]
    params = leaves + list(layer.parameters())
    got = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, (new.lower, new.upper, new.centre))),
                              params, allow_unused=True)
    want = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, ref)), params, allow_unused=True)
    names = ['lower', 'upper', 'centre', 'radius'] + [n for n, _ in layer.named_parameters()]
    for g, w, name in zip(got, want, names):
        g = torch.zeros_like(w) if g is None and w is not None else g
        w = torch.zeros_like(g) if w is None and g is not None else w
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f'gradient w.r.t. {name}')
