"""Empirical local Lipschitzness (empirical.py): analytic values on linear maps, and never above the
certified local bound (after the norm conversion of ``empirical.certified_ratio_bound``)."""
import csv
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import empirical
import local_bound
import models
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
    found = empirical.local_lipschitzness(model, x, eps, norm=norm)
    bound = empirical.certified_ratio_bound(model, x, eps, AUTHORS.replace(sniter=100), norm=norm)
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
