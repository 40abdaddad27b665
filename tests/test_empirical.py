"""Empirical local Lipschitzness (empirical.py): analytic values on linear maps, the published
descent against a transcription of the original loop, a brute-force grid on a tiny network, and never
above the certified bound (``empirical.certified_ratio_bound``, with the denominator's 1e-6 shift)."""
import csv
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import empirical
import local_bound
import models
import norms
from settings import AUTHORS
from helpers import MNIST_MINI, needs_mnist


def rank_one_map(dims=20, classes=4, scale=0.5, seed=0):
    """``f(x) = u (s . x) + b`` with ``s`` in {-scale, +scale}^d: every p-norm ratio peaks at eps * sign(s)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(classes, generator=g)
    s = scale * (torch.randint(0, 2, (dims,), generator=g) * 2.0 - 1.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(dims, classes))
    with torch.no_grad():
        model[1].weight.copy_(torch.outer(u, s))
    return model, u, s


@pytest.mark.parametrize('norm, dual', [('inf', 1.0), (2, 2.0)])
def test_linear_map_reaches_its_analytic_value(norm, dual):
    # max over the box of ||u||_1 |s . d| / ||d||_p is ||u||_1 ||s||_q (q dual to p), at d = eps sign(s)
    # (every coordinate of s has the same size, so that corner is the maximiser for both p).
    # Sign steps then hover within one step of that corner: every |d_i| in [eps - step, eps], so the
    # ascent's tolerance is a relative 1 - step/eps below the maximum (and nothing above it).
    torch.manual_seed(0)
    model, u, s = rank_one_map()
    x = 0.3 + 0.4 * torch.rand(8, 20)
    eps, step = 0.03, 0.003
    found = empirical.local_lipschitzness(model, x, eps, norm=norm, steps=20, step=step)
    analytic = float(u.abs().sum() * torch.linalg.vector_norm(s, ord=dual))
    assert (found >= analytic * (1 - step / eps)).all(), found / analytic
    # the 1e-6 shift inside the denominator's norm moves the ratio by about 1e-6 / eps
    assert (found <= analytic * (1 + 1e-3)).all(), found / analytic


def test_linear_map_with_p1_never_exceeds_its_analytic_value():
    # For p = 1 the ratio of this map is at its maximum ||u||_1 max|s_i| on the whole orthant of
    # sign(s): the gradient there is rounding noise and sign steps bounce back and forth (one step
    # reaches the maximum, the next may undo it). Only the upper bound is a property of the search.
    torch.manual_seed(0)
    model, u, s = rank_one_map()
    x = 0.3 + 0.4 * torch.rand(8, 20)
    analytic = float(u.abs().sum() * s.abs().max())
    reached = empirical.local_lipschitzness(model, x, 0.03, norm=1, steps=1)
    assert reached.tolist() == pytest.approx([analytic] * 8, rel=1e-3)
    assert (empirical.local_lipschitzness(model, x, 0.03, norm=1) <= analytic * (1 + 1e-3)).all()


def test_published_direction_descends_and_mode_is_restored():
    torch.manual_seed(0)
    model, _, _ = rank_one_map()
    model.train()
    x = 0.3 + 0.4 * torch.rand(8, 20)
    up = empirical.local_lipschitzness(model, x, 0.009)
    down = empirical.local_lipschitzness(model, x, 0.009, as_published=True)
    assert model.training
    assert (down < 0.5 * up).all()


def test_dataset_means_csv_and_bad_norm(tmp_path):
    torch.manual_seed(0)
    model, _, _ = rank_one_map()
    x = 0.3 + 0.4 * torch.rand(10, 20)
    loader = DataLoader(TensorDataset(x, torch.zeros(10, dtype=torch.long), torch.arange(100, 110)), batch_size=4)
    out = empirical.dataset_lipschitzness(model, loader, 0.009, progress=False)
    assert out['examples'] == 10 and out['index'].tolist() == list(range(100, 110))
    assert out['lip_max'] == pytest.approx(float(out['per_example_max'].mean()))
    assert out['lip_as_published'] < out['lip_max']
    path = tmp_path / 'run_lipschitz.csv'
    empirical.write_lipschitzness_csv(path, out)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == empirical.LIPSCHITZ_COLUMNS and len(rows) == 10
    assert float(rows[3]['lip_max']) == pytest.approx(float(out['per_example_max'][3]))
    assert rows[0]['norm'] == 'inf' and rows[0]['certified_bound'] == ''
    with pytest.raises(ValueError, match='norm must be'):
        empirical.local_lipschitzness(model, x, 0.01, norm=3)


def test_two_to_one_norm_is_the_largest_signed_row_sum():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # s = (1, 1, 1): W^T s = (2, 2), norm 2 sqrt(2); no other sign vector does better
    assert empirical.two_to_one_norm(w) == pytest.approx(2 * math.sqrt(2))
    big = torch.randn(40, 7)
    bound = empirical.two_to_one_norm(big)
    v = torch.randn(1000, 7)
    assert ((big @ v.T).abs().sum(0) / v.norm(dim=1)).max() <= bound


def small_relux_net(shape, seed):
    torch.manual_seed(seed)
    return models.build_sequential(shape, [(shape[0], 8, 4, 2, 1)], [32, 10], models.relux_activation(1.0))


def assert_below_certified(model, x, eps, norm):
    found, points = empirical.search_points(model, x, eps, norm=norm)
    bound = empirical.certified_ratio_bound(model, x, eps, AUTHORS.replace(sniter=100), norm=norm,
                                            distance=empirical.distances(x, points, norm))
    assert (found <= bound * (1 + 1e-4)).all(), (found / bound).max()
    return found / bound


@pytest.mark.parametrize('norm', ['inf', 2, 1])
def test_random_network_stays_below_the_certified_bound(norm):
    model = small_relux_net((1, 12, 12), seed=1)
    x = torch.rand(16, 1, 12, 12)
    assert_below_certified(model, x, 0.05, norm)


@needs_mnist
def test_trained_mnist_network_stays_below_the_certified_bound():
    from torchvision import datasets
    digits = datasets.MNIST(str(MNIST_MINI), train=True, download=False)
    x = digits.data[:1024].float().div(255).unsqueeze(1)
    y = digits.targets[:1024]
    model = small_relux_net((1, 28, 28), seed=2)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for step in range(60):
        batch = slice(64 * (step % 16), 64 * (step % 16 + 1))
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        local_bound.project_parameters(model)
    test = datasets.MNIST(str(MNIST_MINI), train=False, download=False)
    xt = test.data[:16].float().div(255).unsqueeze(1)
    assert (model(xt).argmax(1) == test.targets[:16]).float().mean() > 0.6   # it did learn
    for eps in (0.02, 0.1):                       # 0.1: the paper's MNIST eps
        ratio = assert_below_certified(model, xt, eps, 2)
    assert ratio.max() > 0.01                     # the comparison is not vacuous


# ----------------------------------------------------------------------------- the published procedure

def published_loop(model, images, eps, seed, steps=10, step=0.003):
    """docs/method_lolip.md §4 transcribed as the original runs it, for p = inf: after
    torch.manual_seed(seed), batches of 16 from a DataLoader, a start at x + 0.001 N(0, 1) drawn on
    the CPU, sign steps on the negated batch-mean ratio, clip to the box then to [0, 1]."""
    torch.manual_seed(seed)
    model.eval()
    scores = []
    for (x,) in DataLoader(TensorDataset(images), batch_size=16, shuffle=False):
        x_adv = x + 0.001 * torch.randn(x.shape)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            top = (model(x) - model(x_adv)).flatten(1).norm(p=1, dim=1)
            bottom = (x - x_adv).flatten(1).add(1e-6).norm(p=float('inf'), dim=1)
            loss = -(top / bottom).mean()
            loss.backward()
            x_adv = x_adv.detach() + step * x_adv.grad.sign()
            x_adv = torch.clamp(x + torch.clamp(x_adv - x, -eps, eps), 0.0, 1.0)
        with torch.no_grad():
            top = (model(x) - model(x_adv)).flatten(1).norm(p=1, dim=1)
            scores.append(top / (x - x_adv).flatten(1).add(1e-6).norm(p=float('inf'), dim=1))
    return torch.cat(scores)


def test_as_published_is_the_published_loop_whatever_ran_before_and_whatever_the_batch():
    model = small_relux_net((1, 12, 12), seed=3)
    images = torch.rand(40, 1, 12, 12)
    expected = published_loop(model, images, 0.05, seed=7)
    torch.manual_seed(123)                      # the global RNG plays no part
    torch.randn(1000)
    labelled = TensorDataset(images, torch.zeros(40, dtype=torch.long))
    out = empirical.dataset_lipschitzness(model, DataLoader(labelled, batch_size=16), 0.05, seed=7, progress=False)
    assert torch.equal(out['per_example_as_published'], expected)                 # bit for bit
    # other batches round the convolutions differently: a few sign steps on near-zero slopes differ
    out = empirical.dataset_lipschitzness(model, DataLoader(labelled, batch_size=7), 0.05, seed=7, progress=False)
    assert out['per_example_as_published'].tolist() == pytest.approx(expected.tolist(), rel=1e-4)
    assert out['lip_as_published'] == pytest.approx(float(expected.mean()), rel=1e-5)
    # the same noise starts the maximisation, which ends far above the descent
    assert (out['per_example_max'] > out['per_example_as_published']).all()
    other = empirical.dataset_lipschitzness(model, DataLoader(labelled, batch_size=16), 0.05, seed=8, progress=False)
    assert other['lip_as_published'] != out['lip_as_published']


# ----------------------------------------------------------------------------- closed forms and brute force

def infinity_to_one_norm(weight):
    """max over sign vectors s of ||W s||_1: the largest ||W d||_1 / ||d||_inf (enumerated)."""
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=weight.size(1))), dtype=torch.float64)
    return float((signs @ weight.double().T).abs().sum(dim=1).max())


def linear_model(weight):
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.size(1), weight.size(0)))
    with torch.no_grad():
        model[1].weight.copy_(weight)
    return model


def test_maximisation_of_a_linear_map_stays_below_its_closed_form():
    # f(x) = W x + b: ||f(x) - f(x')||_1 / ||x - x'||_inf is at most max_s ||W s||_1 (a convex
    # function of d peaks at a vertex of the box), enumerated over the 2^8 sign vectors
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(3, 8, generator=g)
    model = linear_model(weight)
    x = 0.3 + 0.4 * torch.rand(32, 8, generator=g)
    found = empirical.local_lipschitzness(model, x, 0.03, steps=20, generator=empirical.published_noise(0))
    closed = infinity_to_one_norm(weight)
    assert (found <= closed * (1 + 1e-3)).all(), found.max() / closed       # 1e-3: the shift at |d| >= 0.003
    assert found.max() >= 0.95 * closed, found.max() / closed                 # and the search gets there


@pytest.mark.parametrize('norm', ['inf', 2, 1])
def test_certified_ratio_bound_covers_the_shifted_denominator(norm):
    # One input, f(x) = w x: at x' = x + r the measured ratio is |w| r / (r - 1e-6), above |w|, the
    # bound that ignores the shift; the bound at distance r is exactly that sup.
    model = linear_model(torch.tensor([[2.5]]))
    x = torch.tensor([[0.5]])
    for r in (1e-5, 3e-3):
        adv = x + r
        with torch.no_grad():
            measured = empirical.lipschitz_ratio(model(x), model(adv), x, adv, norms.order(norm))
        bound = empirical.certified_ratio_bound(model, x, 0.01, norm=norm, distance=r)
        assert float(measured) > 2.5
        assert float(bound) >= float(measured) * (1 - 1e-6)
        assert float(bound) == pytest.approx(2.5 * r / (r - 1e-6), rel=1e-5)
    assert math.isinf(float(empirical.certified_ratio_bound(model, x, 0.01, norm=norm, distance=1e-6)))


def test_certified_ratio_bound_is_exact_for_an_equal_row_map_with_the_shift():
    # W = u 1^T on d = 9 inputs, x' = x + r 1: ratio ||u||_1 d r / (r - 1e-6); the bound is
    # ||W||_{2->1} sqrt(d) / (1 - 1e-6 / r) = ||u||_1 d / (1 - 1e-6 / r), the same number
    u = torch.tensor([1.5, -0.5])
    model = linear_model(torch.outer(u, torch.ones(9)))
    x = torch.full((1, 9), 0.5)
    r = 2e-4
    adv = x + r
    with torch.no_grad():
        measured = float(empirical.lipschitz_ratio(model(x), model(adv), x, adv, math.inf))
    bound = float(empirical.certified_ratio_bound(model, x, 0.01, distance=r))
    assert bound >= measured * (1 - 1e-6)
    assert bound == pytest.approx(measured, rel=1e-4)


def test_tiny_network_by_brute_force():
    # A 2-input ReLU network: the shifted ratio on a 401 x 401 grid of the box (points at least r
    # from x) stays below the certified bound at distance r, which is not vacuous; both searches end
    # at points of the box whose ratios lie in the grid's range (their last iterates are scored).
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.tensor([[0.4, 0.6]], dtype=torch.float64)
    eps, r = 0.05, 0.003
    axis = torch.linspace(-eps, eps, 401, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    grid = grid[grid.abs().amax(dim=1) >= r]
    with torch.no_grad():
        values = empirical.lipschitz_ratio(model(x), model(x + grid), x.expand_as(grid), x + grid, math.inf)
    bound = float(empirical.certified_ratio_bound(model, x, eps, norm='inf', distance=r))
    assert float(values.max()) <= bound <= 5 * float(values.max())
    for seed in range(4):
        for published in (False, True):
            found, points = empirical.search_points(model, x, eps, steps=20, as_published=published,
                                                    generator=empirical.published_noise(seed))
            assert float((points - x).abs().max()) <= eps + 1e-12
            assert float(empirical.distances(x, points, 'inf')) >= r
            assert 0.98 * float(values.min()) <= float(found) <= 1.02 * float(values.max())
