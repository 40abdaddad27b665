"""The exact last-layer solver (last_layer.exact_solver) against a KKT/bisection reference, sampled
feasible points and the authors' clip-and-rescale iteration; label vs pairwise layouts.

The problem: ``max <w, d>`` s.t. ``|d|_2 <= r`` and ``lower <= d <= upper`` (lower <= 0 <= upper).
"""
import pytest
import torch

import last_layer as ll
import local_bound as lb

DT = torch.float64


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
    got = ll.exact_solver(w, lower, upper, radius)
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
    got = ll.exact_solver(w, lower, upper, radius)
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
    exact = ll.exact_solver(w, lower, upper, radius).double()
    scale = exact.abs().clamp(min=1e-6)
    one = ll.clip_and_rescale(w, lower, upper, radius, active, 1).double()
    many = ll.clip_and_rescale(w, lower, upper, radius, active, 1000).double()
    # clip-and-rescale approaches the optimum from above: never below it
    assert torch.all(one >= exact - 1e-6 * scale)
    assert torch.all(many >= exact - 1e-6 * scale)
    torch.testing.assert_close(many, exact, rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_exact_differentiable_and_finite_gradients():
    w, lower, upper, radius = problems(4)
    leaves = [t.clone().requires_grad_() for t in (w, lower, upper, radius)]
    ll.exact_solver(*leaves).sum().backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    # away from breakpoints the value is smooth: d value / d r = lam * |free part of w|^2 / (lam |free w|) > 0
    w1, lo1, up1 = torch.randn(1, 1, 6, dtype=DT), -torch.ones(1, 1, 6, dtype=DT), torch.ones(1, 1, 6, dtype=DT)
    assert torch.autograd.gradcheck(lambda a, r: ll.exact_solver(a, lo1, up1, r),
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
    label = ll.label_column(weight, y, state, radius, 1, layout='label', translation='exact')
    pair = ll.label_column(weight, y, state, radius, 1, layout='pairwise', translation='exact')
    iterative = ll.label_column(weight, y, state, radius, 1000, layout='label', translation='iterative')
    torch.testing.assert_close(label, pair, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(label, iterative, rtol=1e-7, atol=1e-9)
    assert torch.all(label[torch.arange(batch), y] == 0)
    with pytest.raises(ValueError):
        ll.label_column(weight, y, state, radius, 1, translation='bisect')
