"""The last-layer translation (last_layer.py): the exact solver (last_layer.exact_solver) against a
KKT/bisection reference, sampled feasible points and the authors' clip-and-rescale iteration;
clip-and-rescale against an exact solver (helpers.exact_translation); label vs pairwise layouts.

The problem: ``max <w, d>`` s.t. ``|d|_2 <= r`` and ``lower <= d <= upper`` (lower <= 0 <= upper).
"""
import numpy as np
import pytest
import torch

import last_layer
import local_bound as lb
from settings import AUTHORS
from helpers import DT, exact_translation, small_conv_net, twin_stores


pytestmark = pytest.mark.usefixtures('one_thread')


def reference(w, lower, upper, r, rounds=200):
    """KKT: the optimum is clip(lam w) at the smallest lam >= 0 with |clip(lam w)| = r, or the box
    corner if it fits in the ball; lam by bisection (one problem, float64)."""
    corner = torch.where(w > 0, upper, torch.where(w < 0, lower, torch.zeros_like(w)))
    if corner.norm() <= r:
        return float(w @ corner)
    low, high = 0.0, 1.0
    while torch.clamp(high * w, lower, upper).norm() < r:
        high *= 2
    for _ in range(rounds):
        mid = (low + high) / 2
        low, high = (mid, high) if torch.clamp(mid * w, lower, upper).norm() < r else (low, mid)
    return float(w @ torch.clamp(high * w, lower, upper))


def problems(seed, batch=12, k=5, h=9, dtype=DT):
    """Random problems with the hard cases: a w = 0 row, r = 0, a ball so large that only the box
    binds, coordinates whose box side is 0, and a near-tie of breakpoints."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, k, h, generator=gen, dtype=dtype)
    lower = -torch.rand(batch, 1, h, generator=gen, dtype=dtype) * 0.5
    upper = torch.rand(batch, 1, h, generator=gen, dtype=dtype) * 0.5
    lower[:, :, :2] = 0                 # coordinates that cannot move down
    upper[:, :, 2:3] = 0                # one that cannot move up
    radius = torch.rand(batch, generator=gen, dtype=dtype) * 1.2
    w[0, 1] = 0                         # a trivial problem
    radius[1] = 0                       # no ball at all
    radius[2] = 50.0                    # the box corner lies inside the ball
    w[3, 0, 4] = w[3, 0, 5] * upper[3, 0, 4] / upper[3, 0, 5]   # two equal breakpoints
    return w, lower, upper, radius


def test_exact_equals_kkt_reference():
    w, lower, upper, radius = problems(0)
    got = last_layer.exact_solver(w, lower, upper, radius)
    assert got.shape == w.shape[:2] and got.dtype == DT
    for b in range(w.size(0)):
        for k in range(w.size(1)):
            want = reference(w[b, k], lower[b, 0], upper[b, 0], float(radius[b]))
            assert float(got[b, k]) == pytest.approx(want, rel=1e-12, abs=1e-14), (b, k)
    assert got[0, 1] == 0 and torch.all(got[1] == 0)
    corner = torch.where(w[2] > 0, upper[2], lower[2])
    torch.testing.assert_close(got[2], (w[2] * corner).sum(-1))


def test_exact_not_below_sampled_feasible_points():
    w, lower, upper, radius = problems(1, batch=6, k=3)
    got = last_layer.exact_solver(w, lower, upper, radius)
    gen = torch.Generator().manual_seed(2)
    for b in range(w.size(0)):
        d = torch.randn(4000, w.size(2), generator=gen, dtype=DT)
        d = d * (torch.rand(4000, 1, generator=gen, dtype=DT) ** (1 / w.size(2))) * radius[b] / d.norm(dim=1, keepdim=True)
        d = torch.minimum(torch.maximum(d, lower[b, 0]), upper[b, 0])   # clipping keeps |d| <= r
        best = (d @ w[b].t()).max(dim=0).values
        assert torch.all(got[b] >= best - 1e-12), b


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_exact_at_least_clip_and_rescale_and_equal_at_convergence(dtype):
    w, lower, upper, radius = problems(3, batch=40, k=6, h=30, dtype=dtype)
    active = (w.abs().sum(-1, keepdim=True) > 0).to(dtype)
    exact = last_layer.exact_solver(w, lower, upper, radius).double()
    scale = exact.abs().clamp(min=1e-6)
    one = last_layer.clip_and_rescale(w, lower, upper, radius, active, 1).double()
    many = last_layer.clip_and_rescale(w, lower, upper, radius, active, 1000).double()
    # clip-and-rescale approaches the optimum from above: never below it
    assert torch.all(one >= exact - 1e-6 * scale)
    assert torch.all(many >= exact - 1e-6 * scale)
    torch.testing.assert_close(many, exact, rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_exact_differentiable_and_finite_gradients():
    w, lower, upper, radius = problems(4)
    leaves = [t.clone().requires_grad_() for t in (w, lower, upper, radius)]
    last_layer.exact_solver(*leaves).sum().backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    # away from breakpoints the value is smooth: d value / d r = lam * |free part of w|^2 / (lam |free w|) > 0
    w1, lo1, up1 = torch.randn(1, 1, 6, dtype=DT), -torch.ones(1, 1, 6, dtype=DT), torch.ones(1, 1, 6, dtype=DT)
    assert torch.autograd.gradcheck(lambda a, r: last_layer.exact_solver(a, lo1, up1, r),
                                    (w1.requires_grad_(), torch.tensor([0.7], dtype=DT, requires_grad=True)))


def test_exact_translation_in_both_layouts():
    gen = torch.Generator().manual_seed(5)
    batch, classes, h = 4, 5, 12
    weight = torch.randn(classes, h, generator=gen, dtype=DT)
    centre = torch.rand(batch, h, generator=gen, dtype=DT)
    state = lb.BoundState(centre, torch.zeros(batch, dtype=DT), centre - 0.3 * torch.rand(batch, h, generator=gen, dtype=DT),
                          centre + 0.3 * torch.rand(batch, h, generator=gen, dtype=DT))
    radius = torch.rand(batch, generator=gen, dtype=DT)
    y = torch.tensor([0, 3, 1, 4])
    label = last_layer.label_column(weight, y, state, radius, 1, layout='label', translation='exact')
    pair = last_layer.label_column(weight, y, state, radius, 1, layout='pairwise', translation='exact')
    iterative = last_layer.label_column(weight, y, state, radius, 1000, layout='label', translation='iterative')
    torch.testing.assert_close(label, pair, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(label, iterative, rtol=1e-7, atol=1e-9)
    assert torch.all(label[torch.arange(batch), y] == 0)
    with pytest.raises(ValueError):
        last_layer.label_column(weight, y, state, radius, 1, translation='bisect')


# ----------------------------------------------------------------------------- clip-and-rescale and the layouts

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


def test_label_translation_gradient_is_reproducible_on_two_threads():
    """The weight gradient through the label column is the same on every repetition with 2 intra-op
    threads and many repeated labels (integer indexing of the label rows accumulated them in a
    thread-dependent order: 4 of 4 repetitions differed), so a seeded training run repeats."""
    rng = np.random.default_rng(5)
    batch, classes, h = 256, 10, 512        # above the size at which CPU ops go parallel
    weight = torch.tensor(rng.standard_normal((classes, h)), dtype=torch.float32, requires_grad=True)
    state = random_state(rng, batch, h)
    state = lb.BoundState(*(t.float() for t in (state.centre, state.radius, state.lower, state.upper)))
    radius = torch.tensor(rng.uniform(0.1, 1.5, batch), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, classes, batch))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(5):
            weight.grad = None
            last_layer.label_translation(weight, y, state, radius, 2).pow(2).sum().backward()
            grads.append(weight.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_label_translation_takes_int32_labels():
    """Labels of any integer dtype, as integer indexing took them (the one-hot product needs int64)."""
    rng = np.random.default_rng(6)
    weight = torch.tensor(rng.standard_normal((5, 12)))
    state, radius = random_state(rng, 4, 12), torch.tensor(rng.uniform(0.1, 1.5, 4))
    y = torch.tensor([0, 3, 1, 4])
    torch.testing.assert_close(last_layer.label_translation(weight, y.int(), state, radius, 3),
                               last_layer.label_translation(weight, y, state, radius, 3), rtol=0, atol=0)


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
