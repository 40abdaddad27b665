"""Numerical tests of local_bound.py against independent computations written from docs/method.md.

The reference side never calls the code under test: explicit matrices are built by applying the
layers to basis vectors, spectral norms come from ``torch.linalg.svdvals``, the last-layer problem is
solved exactly (KKT + bisection), and the ball/box pass of docs/method.md §2 is re-implemented in
``reference_pass``. Small float64 networks keep this exact and fast (CPU, under a minute).
The module runs torch single-threaded: on a loaded 2-core machine, intra-op threads make these
small convolutions up to ~100x slower (spinning OpenMP workers), single-threaded they take seconds.
"""
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
import data_load
import last_layer
import local_bound as lb
import models
import spectral
import utils
from settings import AUTHORS, TRAINING
from utils import ClampGroupSort, Flatten, ReLU_x
from helpers import (DT, attack_margin, explicit_matrix, layer_outputs, masked_matrix, per_neuron_attack_points,
                     random_thresholds, sample_ball, small_conv_net, small_mlp, top_singular, _seed)


pytestmark = pytest.mark.usefixtures('one_thread')


# ============================================================================ independent helpers


def exact_translation(w, lower, upper, radius, iters=200):
    """Exact ``max <w, d>`` s.t. ``|d|_2 <= radius``, ``lower <= d <= upper`` (lower <= 0 <= upper).

    KKT: ``d = clip(lam * w, lower, upper)`` with the smallest lam >= 0 making ``|d| = radius``; if the
    box corner in the direction of w already fits in the ball, it is the optimum.
    """
    w, lower, upper = (np.asarray(a, dtype=np.float64) for a in (w, lower, upper))
    corner = np.where(w > 0, upper, np.where(w < 0, lower, 0.0))
    if np.linalg.norm(corner) <= radius:
        return float(w @ corner)
    lo, hi = 0.0, 1.0
    while np.linalg.norm(np.clip(hi * w, lower, upper)) < radius:
        hi *= 2.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if np.linalg.norm(np.clip(mid * w, lower, upper)) < radius:
            lo = mid
        else:
            hi = mid
    return float(w @ np.clip(hi * w, lower, upper))


def filter_row_norms(layer, out_shape):
    """Per-output-neuron L2 norm of the layer's row (docs/method.md §2: a conv uses the whole filter's norm)."""
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        return w.norm(dim=1)
    return w.flatten(1).norm(dim=1).view(-1, 1, 1).expand(*out_shape)


def reference_pass(model, x, eps):
    """docs/method.md §2, written independently, with exact (SVD) global norms. Per sample b returns a dict:

    centre, lower, upper (penultimate), boxes (lower, upper after every layer but the last),
    masks {activation index: 0/1 varying mask}, affine [(index, matrix, in_mask, out_mask)],
    global_sigma {index: exact ||W||}, local_product (product of exact masked norms).
    """
    layers = list(model)
    results = []
    with torch.no_grad():
        for b in range(x.size(0)):
            m = x[b:b + 1]
            lower, upper, r = m - eps, m + eps, float(eps)
            mask, boxes, masks, affine, sigmas = None, [], {}, [], {}
            for idx, layer in enumerate(layers[:-1]):
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    in_shape = tuple(m.shape[1:])
                    mat = explicit_matrix(layer, in_shape)
                    out = layer(m)
                    out_shape = tuple(out.shape[1:])
                    mid = layer((lower + upper) / 2)
                    rad = (mat.abs() @ ((upper - lower) / 2).reshape(-1)).view(1, *out_shape)
                    ball = r * filter_row_norms(layer, out_shape).unsqueeze(0)
                    lower = torch.maximum(mid - rad, out - ball)
                    upper = torch.minimum(mid + rad, out + ball)
                    sigma = top_singular(mat)
                    sigmas[idx] = sigma
                    affine.append([idx, mat, mask, None])
                    m, r = out, r * sigma
                elif isinstance(layer, (ReLU_x, nn.ReLU)):
                    if isinstance(layer, ReLU_x):
                        theta = layer.threshold.detach()
                        act = lambda t, th=theta: torch.clamp(torch.minimum(t, th), min=0.0)  # noqa: E731
                        mask = ((lower <= theta) & (upper > 0)).to(x.dtype)
                    else:
                        act = torch.relu
                        mask = (upper > 0).to(x.dtype)
                    affine[-1][3] = mask
                    lower = torch.maximum(act(lower), act(m - r))
                    upper = torch.minimum(act(upper), act(m + r))
                    m = act(m)
                    masks[idx] = mask
                elif isinstance(layer, ClampGroupSort):
                    hi_t, lo_t = layer.max.detach(), layer.min.detach()

                    def act(t, hi_t=hi_t, lo_t=lo_t):
                        a, c = t.chunk(2, dim=1)
                        return torch.cat([torch.minimum(torch.maximum(a, c), hi_t),
                                          torch.maximum(torch.minimum(a, c), lo_t)], dim=1)
                    lower = torch.maximum(act(lower), act(m - r))
                    upper = torch.minimum(act(upper), act(m + r))
                    m = act(m)
                    high_lower = lower.chunk(2, dim=1)[0]
                    low_upper = upper.chunk(2, dim=1)[1]
                    mask = torch.cat([(high_lower < hi_t), (low_upper > lo_t)], dim=1).to(x.dtype)
                    masks[idx] = mask
                elif isinstance(layer, (Flatten, nn.Flatten)):
                    m, lower, upper = m.reshape(1, -1), lower.reshape(1, -1), upper.reshape(1, -1)
                    mask = None if mask is None else mask.reshape(1, -1)
                else:
                    raise TypeError(type(layer))
                boxes.append((lower, upper))
            product = 1.0
            for idx, mat, in_mask, out_mask in affine:
                product *= top_singular(masked_matrix(mat, in_mask, out_mask))
            results.append(dict(centre=m, lower=lower, upper=upper, boxes=boxes, masks=masks,
                                affine=affine, global_sigma=sigmas, local_product=product))
    return results


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


# ============================================================================ 1. masked spectral norm

CONV_CASES = [  # (c_in, c_out, kernel, stride, padding, height, width)
    (2, 3, 3, 1, 0, 5, 5),
    (2, 3, 3, 1, 1, 6, 6),
    (2, 3, 4, 1, 1, 5, 6),
    (2, 3, 4, 2, 1, 7, 7),
    (2, 3, 4, 2, 1, 8, 8),
    (3, 2, 4, 2, 0, 9, 9),
    (2, 2, 3, 2, 0, 8, 7),
    (2, 3, 3, 2, 1, 7, 8),
    (3, 2, 4, 2, 0, 10, 11),
]


@pytest.mark.parametrize('case', CONV_CASES, ids=lambda c: 'c{}-{}_k{}s{}p{}_{}x{}'.format(*c))
def test_conv_operator_matches_explicit_matrix(case):
    c_in, c_out, k, s, p, h, w = case
    _seed(1)
    layer = nn.Conv2d(c_in, c_out, k, s, p).to(DT)
    op = lb.ConvOperator(layer, (c_in, h, w))
    mat = explicit_matrix(layer, (c_in, h, w))
    ref_out = F.conv2d(torch.zeros(1, c_in, h, w, dtype=DT), layer.weight, None, s, p)
    assert tuple(op.out_shape) == tuple(ref_out.shape[1:])
    u = torch.randn(3, c_in, h, w, dtype=DT)
    v = torch.randn(3, *op.out_shape, dtype=DT)
    torch.testing.assert_close(op.linear(u).reshape(3, -1), u.reshape(3, -1) @ mat.T)
    adj = op.adjoint(v)
    assert adj.shape == u.shape, f'adjoint shape {tuple(adj.shape)} != input shape {tuple(u.shape)}'
    torch.testing.assert_close(adj.reshape(3, -1), v.reshape(3, -1) @ mat)
    # The absolute operator is |W| applied to the input (for the interval box).
    torch.testing.assert_close(op.absolute(u.abs()).reshape(3, -1), u.abs().reshape(3, -1) @ mat.abs().T)


@pytest.mark.parametrize('case', CONV_CASES, ids=lambda c: 'c{}-{}_k{}s{}p{}_{}x{}'.format(*c))
def test_masked_spectral_norm_conv_equals_svd(case):
    c_in, c_out, k, s, p, h, w = case
    _seed(2)
    layer = nn.Conv2d(c_in, c_out, k, s, p).to(DT)
    op = lb.ConvOperator(layer, (c_in, h, w))
    mat = explicit_matrix(layer, (c_in, h, w))
    batch = 4
    in_mask = (torch.rand(batch, c_in, h, w) < 0.6).to(DT)
    out_mask = (torch.rand(batch, *op.out_shape) < 0.6).to(DT)
    in_mask[0], out_mask[0] = 1.0, 1.0          # sample 0 unmasked
    u = torch.randn(batch, c_in, h, w, dtype=DT)
    with torch.no_grad():
        sigma, u_final = spectral.masked_spectral_norm(op, u, in_mask, out_mask, 2000, 1e-7)
    assert sigma.shape == (batch,)
    for b in range(batch):
        expected = top_singular(masked_matrix(mat, in_mask[b], out_mask[b]))
        assert float(sigma[b]) == pytest.approx(expected, rel=1e-3), f'sample {b}'
        # The returned vector is a unit vector supported on the input mask.
        assert float(u_final[b].norm()) == pytest.approx(1.0, rel=1e-6)
        assert float((u_final[b] * (1 - in_mask[b])).abs().max()) == 0.0
    # No masks: the plain spectral norm.
    with torch.no_grad():
        plain, _ = spectral.masked_spectral_norm(op, u, None, None, 2000, 1e-7)
    assert float(plain[0]) == pytest.approx(top_singular(mat), rel=1e-3)


def test_masked_spectral_norm_linear_equals_svd():
    _seed(3)
    layer = nn.Linear(20, 15).to(DT)
    op = lb.LinearOperator(layer, (20,))
    in_mask = (torch.rand(5, 20) < 0.5).to(DT)
    out_mask = (torch.rand(5, 15) < 0.5).to(DT)
    u = torch.randn(5, 20, dtype=DT)
    with torch.no_grad():
        sigma, _ = spectral.masked_spectral_norm(op, u, in_mask, out_mask, 2000, 1e-7)
    for b in range(5):
        expected = top_singular(masked_matrix(layer.weight.detach(), in_mask[b], out_mask[b]))
        assert float(sigma[b]) == pytest.approx(expected, rel=1e-3, abs=1e-12), f'sample {b}'
    torch.testing.assert_close(op.adjoint(torch.ones(2, 15, dtype=DT)), torch.ones(2, 15, dtype=DT) @ layer.weight)


def test_masked_spectral_norm_all_masked_is_zero_not_nan():
    layer = nn.Linear(6, 5).to(DT)
    op = lb.LinearOperator(layer, (6,))
    sigma, u = spectral.masked_spectral_norm(op, torch.randn(2, 6, dtype=DT), torch.zeros(2, 6, dtype=DT),
                                       None, 10, 1e-6)
    assert torch.all(sigma == 0) and torch.isfinite(u).all()


# ============================================================================ 2. local <= global

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


def affine_layers(model, input_shape):
    """[(layer, input shape)] of every conv/linear layer but the last (computed with the plain forward)."""
    out, x = [], torch.zeros(1, *input_shape, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        for layer in list(model)[:-1]:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                out.append((layer, tuple(x.shape[1:])))
            x = layer(x)
    return out


def test_per_layer_global_norm_equals_svd():
    model = small_conv_net('relux', seed=7)
    x = torch.rand(2, 2, 7, 7, dtype=DT)
    state = lb.propagate(model, x, 0.1, AUTHORS.replace(sniter=3000))
    layers = affine_layers(model, (2, 7, 7))
    assert [rec.index for rec in state.records] == [i for i, l in enumerate(list(model)[:-1])
                                                     if isinstance(l, (nn.Conv2d, nn.Linear))]
    for rec, (layer, shape) in zip(state.records, layers):
        assert rec.op.layer is layer
        assert float(rec.global_sigma.detach()) == pytest.approx(top_singular(explicit_matrix(layer, shape)), rel=1e-4)


def test_global_lipschitz_accepts_float64_model():
    """Regression (bug up to 2f71efe): global_lipschitz built its probe input in float32, so a float64
    model crashed ('Input type (float) and bias type (double) should be the same')."""
    model = small_conv_net('relux', seed=8)
    exact = math.prod(top_singular(explicit_matrix(l, s)) for l, s in affine_layers(model, (2, 7, 7)))
    try:
        glob = lb.global_lipschitz(model, sniter=3000, input_shape=(2, 7, 7))
    except RuntimeError as err:
        pytest.fail(f'BUG local_bound.global_lipschitz: fails on a float64 model ({err}); '
                    'the zeros probe should use the parameters\' dtype')
    assert glob == pytest.approx(exact, rel=1e-4)


def test_warm_start_vectors_follow_a_dtype_change():
    """After a float32 pass, converting the same model to float64 must not crash the global power
    iteration. Regression (bug up to 2f71efe): global_spectral_norm re-used the cached warm-start
    vector when shape and device matched, without checking its dtype."""
    model = small_conv_net('relux', seed=9, dtype=torch.float32)
    x, y = torch.rand(2, 2, 7, 7), torch.tensor([0, 1])
    lb.worst_case_logits(model, x, y, 0.1, TRAINING.replace(sniter=2, opt_iter=2))
    model.double()
    try:
        out = lb.worst_case_logits(model, x.double(), y, 0.1, TRAINING.replace(sniter=2, opt_iter=2))
    except RuntimeError as err:
        pytest.fail(f'BUG local_bound.global_spectral_norm: stale float32 warm-start vector used with '
                    f'float64 weights ({err}); also compare u.dtype with the weight dtype')
    assert out.dtype == torch.float64


# ============================================================================ 3. last-layer translation

def random_box_problems(rng, count, h, regime):
    """(w, lower, upper, radius) problems; regime: 'free' (box inactive), 'corner' (box inside the
    ball), 'mixed' (some coordinates clipped), 'zeros' (many zero-width coordinates, like fixed neurons)."""
    problems = []
    for _ in range(count):
        w = rng.standard_normal(h)
        if regime == 'free':
            lower, upper, radius = -np.full(h, 50.0), np.full(h, 50.0), rng.uniform(0.1, 2.0)
        elif regime == 'corner':
            lower, upper = -rng.uniform(0, 0.05, h), rng.uniform(0, 0.05, h)
            radius = rng.uniform(1.0, 3.0)
        elif regime == 'mixed':
            lower, upper = -rng.uniform(0, 1, h) ** 2, rng.uniform(0, 1, h) ** 2
            radius = rng.uniform(0.3, 2.0)
        else:
            lower, upper = -rng.uniform(0, 1, h), rng.uniform(0, 1, h)
            zero = rng.random(h) < 0.5
            lower[zero] = 0.0
            upper[zero & (rng.random(h) < 0.5)] = 0.0
            radius = rng.uniform(0.3, 2.0)
        problems.append((w, lower, upper, float(radius)))
    return problems


def run_clip_and_rescale(problems, opt_iter, dtype=DT):
    w = torch.tensor(np.stack([p[0] for p in problems]), dtype=dtype).unsqueeze(1)
    lower = torch.tensor(np.stack([p[1] for p in problems]), dtype=dtype).unsqueeze(1)
    upper = torch.tensor(np.stack([p[2] for p in problems]), dtype=dtype).unsqueeze(1)
    radius = torch.tensor([p[3] for p in problems], dtype=dtype)
    active = torch.ones(len(problems), 1, 1, dtype=dtype)
    with torch.no_grad():
        return last_layer.clip_and_rescale(w, lower, upper, radius, active, opt_iter)[:, 0].double().numpy()


@pytest.mark.parametrize('regime', ['free', 'corner', 'mixed', 'zeros'])
def test_clip_and_rescale_matches_exact_solver(regime):
    rng = np.random.default_rng(10)
    problems = random_box_problems(rng, 200, 17, regime)
    exact = np.array([exact_translation(*p) for p in problems])
    corner_inside = [np.linalg.norm(np.where(p[0] > 0, p[2], p[1])) <= p[3] for p in problems]
    if regime == 'free':
        np.testing.assert_allclose(exact, [p[3] * np.linalg.norm(p[0]) for p in problems], rtol=1e-9)
    if regime == 'corner':
        assert all(corner_inside)
    box_active = exact < np.array([p[3] * np.linalg.norm(p[0]) for p in problems]) * (1 - 1e-9)
    if regime in ('mixed', 'zeros'):
        assert np.sum(box_active & ~np.array(corner_inside)) > len(problems) // 2, 'too few mixed problems'
    one = run_clip_and_rescale(problems, 1)
    many = run_clip_and_rescale(problems, 1000)
    assert np.all(one >= exact - 1e-6), f'opt_iter=1 under-estimates by {np.max(exact - one)}'
    np.testing.assert_allclose(many, exact, rtol=1e-4, atol=1e-8)
    # Never above the ball-only bound r * |w|.
    assert np.all(one <= np.array([p[3] * np.linalg.norm(p[0]) for p in problems]) * (1 + 1e-9) + 1e-9)
    # More iterations can only tighten (monotone from above).
    assert np.all(many <= one + 1e-9)


def test_clip_and_rescale_float32_matches_exact_solver():
    rng = np.random.default_rng(11)
    problems = random_box_problems(rng, 300, 40, 'mixed') + random_box_problems(rng, 300, 40, 'zeros')
    exact = np.array([exact_translation(*p) for p in problems])
    many = run_clip_and_rescale(problems, 1000, torch.float32)
    np.testing.assert_allclose(many, exact, rtol=1e-4, atol=1e-5)


def test_clip_and_rescale_float32_ill_conditioned_never_underestimates():
    """Two large coordinates in a tight box carry almost all of w's norm; the free ones are tiny.

    Exact optimum: the two clipped coordinates give 2e-3, the free ones take the rest of the ball.
    Regression (bug up to 2f71efe): clip_and_rescale computed the free part's norm as
    sqrt(r^2 - |clipped part|^2), which cancels catastrophically in float32, and under-estimated
    this optimum by 1.7%, i.e. the worst-case logits were not an upper bound (docs/method.md §3: it never
    under-estimates).
    """
    w = np.array([1.0, 1.0, 1e-3, 1e-3, 1e-3, 1e-3])
    lower = np.array([-1e-3, -1e-3, -1.0, -1.0, -1.0, -1.0])
    problem = (w, lower, -lower, 1.0)
    exact = exact_translation(*problem)
    got64 = run_clip_and_rescale([problem], 1000, torch.float64)[0]
    assert got64 == pytest.approx(exact, rel=1e-6)
    got32 = run_clip_and_rescale([problem], 1000, torch.float32)[0]
    assert got32 >= exact * (1 - 1e-5), (
        f'BUG local_bound.clip_and_rescale (float32): {got32:.7g} under-estimates the exact optimum '
        f'{exact:.7g} by {100 * (exact - got32) / exact:.2f}% (free-part norm from sqrt(target^2 - '
        f'norm_before^2) cancels; measure |d * inside| instead)')


def test_clip_and_rescale_inactive_rows_give_zero():
    w = torch.randn(2, 3, 5, dtype=DT)
    w[:, 1] = 0.0
    active = torch.ones(2, 3, 1, dtype=DT)
    active[:, 1] = 0.0
    out = last_layer.clip_and_rescale(w, -torch.ones(2, 1, 5, dtype=DT) * 0.1, torch.ones(2, 1, 5, dtype=DT) * 0.1,
                              torch.tensor([1.0, 2.0], dtype=DT), active, 100)
    assert torch.isfinite(out).all()
    assert torch.all(out[:, 1] == 0)


def random_state(rng, batch, h, zero_fraction=0.3):
    centre = torch.tensor(rng.uniform(0, 1, (batch, h)))
    lower = centre - torch.tensor(rng.uniform(0, 0.5, (batch, h)))
    upper = centre + torch.tensor(rng.uniform(0, 0.5, (batch, h)))
    fixed = torch.tensor(rng.random((batch, h)) < zero_fraction)
    lower, upper = torch.where(fixed, centre, lower), torch.where(fixed, centre, upper)
    return lb.BoundState(centre, torch.zeros(batch, dtype=DT), lower, upper)


@pytest.mark.parametrize('opt_iter', [1, 1000])
def test_label_translation_is_a_column_of_pairwise(opt_iter):
    rng = np.random.default_rng(12)
    batch, classes, h = 4, 5, 12
    weight = torch.tensor(rng.standard_normal((classes, h)))
    state = random_state(rng, batch, h)
    radius = torch.tensor(rng.uniform(0.1, 1.5, batch))
    table = last_layer.pairwise_translation(weight, state, radius, opt_iter)
    assert table.shape == (batch, classes, classes)
    assert torch.all(torch.diagonal(table, dim1=1, dim2=2) == 0)
    for label in range(classes):
        y = torch.full((batch,), label, dtype=torch.long)
        column = last_layer.label_translation(weight, y, state, radius, opt_iter)
        torch.testing.assert_close(column, table[:, :, label], rtol=1e-9, atol=1e-12)
    y = torch.tensor([0, 3, 1, 4])
    column = last_layer.label_translation(weight, y, state, radius, opt_iter)
    torch.testing.assert_close(column, table[torch.arange(batch), :, y], rtol=1e-9, atol=1e-12)
    if opt_iter == 1000:
        for b in range(batch):
            lo = torch.clamp(state.lower[b] - state.centre[b], max=0).numpy()
            up = torch.clamp(state.upper[b] - state.centre[b], min=0).numpy()
            for i in range(classes):
                for j in range(classes):
                    if i != j:
                        w = (weight[i] - weight[j]).numpy()
                        expected = exact_translation(w, lo, up, float(radius[b]))
                        assert float(table[b, i, j]) == pytest.approx(expected, rel=1e-4, abs=1e-9)


def twin_stores(model, input_shape, n):
    """Two stores with identical start vectors, so two bound passes start from the same vectors."""
    stores = [lb.SingularVectorStore(model, input_shape, n, seed=123) for _ in range(2)]
    for i in stores[0].vectors:
        assert torch.equal(stores[0].vectors[i], stores[1].vectors[i])
    return stores


def test_bound_outputs_pairwise_equals_label():
    model = small_conv_net('relux', seed=13, dtype=torch.float32)
    x, y = torch.rand(3, 2, 7, 7), torch.tensor([0, 2, 3])
    lb.global_lipschitz(model, sniter=3000, input_shape=(2, 7, 7))
    s1, s2 = twin_stores(model, (2, 7, 7), 3)
    index = torch.arange(3)
    settings = AUTHORS.replace(sniter=200, opt_iter=1000)
    a = lb.bound_outputs(model, x, y, 0.2, settings.replace(layout='label'), store=s1, index=index)
    b = lb.bound_outputs(model, x, y, 0.2, settings.replace(layout='pairwise'), store=s2, index=index)
    torch.testing.assert_close(a.lipschitz, b.lipschitz, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.worst, b.worst, rtol=1e-5, atol=1e-6)


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


def propagate_records(model, x, eps, sniter=3000):
    return lb.propagate(model, x, eps, AUTHORS.replace(sniter=sniter)).records


# ============================================================================ 4. masks by sampling


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


# ============================================================================ 5. soundness

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


# ============================================================================ 6. gloro

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


# ============================================================================ 7. global-bound option

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


# ============================================================================ 8. per-example store

def test_store_gather_scatter_round_trip_and_sharding():
    model = small_conv_net('relux', seed=60, dtype=torch.float32)
    store = lb.SingularVectorStore(model, (2, 7, 7), 10, seed=5)
    shapes = {i: s for i, (l, s) in zip([0, 2, 5], affine_layers(model, (2, 7, 7)))}
    assert set(store.vectors) == set(shapes)
    for i, s in shapes.items():
        assert tuple(store.vectors[i].shape) == (10, *s)
    index = torch.tensor([7, 2, 9])
    got = store.gather(index, 'cpu')
    for i in shapes:
        torch.testing.assert_close(got[i], store.vectors[i][index])
    new = {i: torch.randn(3, *s) for i, s in shapes.items()}
    store.scatter(index, new)
    back = store.gather(index, 'cpu')
    for i in shapes:
        torch.testing.assert_close(back[i], new[i])
        torch.testing.assert_close(store.vectors[i][index], new[i])
    untouched = torch.tensor([0, 1, 3])
    fresh = lb.SingularVectorStore(model, (2, 7, 7), 10, seed=5)
    for i in shapes:
        torch.testing.assert_close(store.vectors[i][untouched], fresh.vectors[i][untouched])
    # Sharding: a store owning examples [7, 2, 5] holds the same rows as the full store.
    owned = torch.tensor([7, 2, 5])
    shard = lb.SingularVectorStore(model, (2, 7, 7), 10, seed=5, owned=owned)
    for i in shapes:
        assert shard.vectors[i].shape[0] == 3
        torch.testing.assert_close(shard.gather(torch.tensor([5, 7]), 'cpu')[i], fresh.vectors[i][torch.tensor([5, 7])])
    shard.scatter(torch.tensor([2]), {i: torch.full((1, *s), 3.0) for i, s in shapes.items()})
    for i in shapes:
        assert torch.all(shard.vectors[i][1] == 3.0)        # dataset index 2 is the shard's row 1
        assert not torch.any(shard.vectors[i][0] == 3.0)
    with pytest.raises(IndexError):
        shard.gather(torch.tensor([3]), 'cpu')
    with pytest.raises(ValueError):
        lb.SingularVectorStore(model, (2, 7, 7), 10, layers=[1])


def one_power_step(mat, u, in_mask, out_mask):
    """u <- D_in u; v = normalise(D_out W u); u = normalise(D_in W^T v) (docs/method.md §2)."""
    a = masked_matrix(mat, in_mask, out_mask)
    v = a @ u
    v = v / v.norm()
    back = a.T @ v
    return back / back.norm()


def test_store_warm_start_converges_to_top_singular_vectors():
    model = small_conv_net('relux', seed=61, dtype=torch.float32)
    _seed(62)
    x = 0.2 + 0.6 * torch.rand(2, 2, 7, 7)
    y = torch.tensor([1, 2])
    eps = 0.2
    index = torch.tensor([3, 1])
    store = lb.SingularVectorStore(model, (2, 7, 7), 5, seed=0)
    before = {i: v.clone() for i, v in store.vectors.items()}
    lb.global_lipschitz(model, sniter=3000, input_shape=(2, 7, 7))   # converge the global vectors first
    lb.worst_case_logits(model, x, y, eps, TRAINING, store=store, index=index)
    recs = propagate_records(model, x, eps)
    mats = {rec.index: explicit_matrix(rec.op.layer, rec.op.in_shape).double() for rec in recs}
    for rec in recs:
        i = rec.index
        assert not torch.equal(store.vectors[i][index], before[i][index]), f'layer {i}: store not written'
        torch.testing.assert_close(store.vectors[i][torch.tensor([0, 2, 4])], before[i][torch.tensor([0, 2, 4])])
        for b in range(2):
            in_mask = None if rec.in_mask is None else rec.in_mask[b].double()
            out_mask = None if rec.out_mask is None else rec.out_mask[b].double()
            expected = one_power_step(mats[i], before[i][index[b]].double().reshape(-1), in_mask, out_mask)
            torch.testing.assert_close(store.vectors[i][index[b]].double().reshape(-1), expected,
                                       rtol=1e-4, atol=1e-5, msg=f'layer {i}: one power step from the store')
    for _ in range(150):
        lb.worst_case_logits(model, x, y, eps, TRAINING, store=store, index=index)
    recs = propagate_records(model, x, eps)
    for rec in recs:
        for b in range(2):
            in_mask = None if rec.in_mask is None else rec.in_mask[b].double()
            out_mask = None if rec.out_mask is None else rec.out_mask[b].double()
            a = masked_matrix(mats[rec.index], in_mask, out_mask)
            _, s, vh = torch.linalg.svd(a)
            assert s[0] > s[1] * 1.02, 'test needs a singular gap'
            u = store.vectors[rec.index][index[b]].double().reshape(-1)
            cos = float((u @ vh[0]).abs() / u.norm())
            assert cos > 0.999, f'layer {rec.index} sample {b}: stored vector not the top singular vector ({cos})'


def test_store_restricted_layers_use_global_norm_elsewhere():
    model = small_conv_net('relux', seed=63)
    model32 = small_conv_net('relux', seed=63, dtype=torch.float32)
    _seed(64)
    x = 0.2 + 0.6 * torch.rand(3, 2, 7, 7)
    y = torch.tensor([0, 1, 2])
    eps = 0.2
    store = lb.SingularVectorStore(model32, (2, 7, 7), 6, layers=[0, 5], seed=1)
    assert set(store.vectors) == {0, 5} and 2 not in store
    out = lb.bound_outputs(model32, x, y, eps, AUTHORS.replace(sniter=3000, opt_iter=1000), store=store,
                           index=torch.tensor([0, 4, 5]))
    refs = reference_pass(model, x.double(), eps)
    for b, ref in enumerate(refs):
        expected = 1.0
        for idx, mat, in_mask, out_mask in ref['affine']:
            if idx in (0, 5):
                expected *= top_singular(masked_matrix(mat, in_mask, out_mask))
            else:
                expected *= ref['global_sigma'][idx]
        assert float(out.lipschitz[b].detach()) == pytest.approx(expected, rel=1e-3), f'sample {b}'
        assert float(out.lipschitz[b].detach()) > ref['local_product'] * (1 + 1e-3), 'layer 2 should use its (larger) global norm'


# ============================================================================ 9. gradients

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


def conv_or_linear_sigma_grad(layer, in_shape, in_mask, out_mask):
    """Exact d||D_out W D_in||_2 / dW = grad of <v, W u> with the top singular pair (u, v) fixed."""
    a = masked_matrix(explicit_matrix(layer, in_shape), in_mask, out_mask)
    left, sv, right = torch.linalg.svd(a)
    assert sv[0] > 1.02 * sv[1], 'test needs a singular gap'
    u, v = right[0], left[:, 0]
    weight = layer.weight.detach().clone().requires_grad_(True)
    if isinstance(layer, nn.Linear):
        value = v @ (weight @ u)
    else:
        out = F.conv2d(u.view(1, *in_shape), weight, None, layer.stride, layer.padding)
        value = (out.reshape(-1) * v).sum()
    grad, = torch.autograd.grad(value, weight)
    return grad


@pytest.mark.parametrize('layer_kind', ['linear', 'conv'])
def test_masked_spectral_norm_gradient_matches_svd(layer_kind):
    """The gradient through the (converged) power iteration is the spectral-norm gradient D_out v u^T D_in."""
    _seed(80)
    if layer_kind == 'linear':
        layer, in_shape = nn.Linear(12, 9).to(DT), (12,)
        op = lb.LinearOperator(layer, in_shape)
    else:
        layer, in_shape = nn.Conv2d(2, 3, 4, 2, 1).to(DT), (2, 7, 7)
        op = lb.ConvOperator(layer, in_shape)
    in_mask = (torch.rand(1, *in_shape) < 0.7).to(DT)
    out_mask = (torch.rand(1, *op.out_shape) < 0.7).to(DT)
    expected = conv_or_linear_sigma_grad(layer, in_shape, in_mask[0], out_mask[0])
    sigma, _ = spectral.masked_spectral_norm(op, torch.randn(1, *in_shape, dtype=DT), in_mask, out_mask, 1500, 1e-12)
    grad, = torch.autograd.grad(sigma.sum(), layer.weight)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-4 * float(expected.norm()))


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
    state = lb.BoundState(centre_, radius_, lower, upper, None, [record])
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
