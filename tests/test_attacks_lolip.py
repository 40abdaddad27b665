"""lolip's evaluation attacks (docs/method_lolip.md §3 settings over attacks.py) and the report's
local Lipschitzness: in the ball and [0, 1], analytic worst cases of linear models, multi-targeted
at least as strong as PGD on a trained network, the analytic Lipschitzness of a linear map."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from lolip import report
from lolip.adversaries import build_attack


def size(delta, norm):
    flat = delta.flatten(1)
    return flat.norm(dim=1) if norm == 2 else flat.abs().amax(dim=1)


@pytest.mark.parametrize('name', ['pgd', 'multitarget'])
@pytest.mark.parametrize('norm, eps', [(math.inf, 0.1), (2, 1.0)])
def test_results_stay_in_the_ball_and_in_the_unit_box(name, norm, eps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.rand(16, 3, 4, 4)
    x[0] = 0.0  # corners of the box, where clipping matters most
    x[1] = 1.0
    y = torch.randint(0, 4, (16,))
    adv = build_attack(name, eps, norm, 4)(model, x, y)
    assert (size(adv - x, norm) <= eps * (1 + 1e-5)).all()
    assert adv.min() >= 0 and adv.max() <= 1


def two_class_linear(w, bias=0.0):
    model = nn.Sequential(nn.Flatten(), nn.Linear(len(w), 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([w, -w]))
        model[1].bias.copy_(torch.tensor([bias, -bias]))
    return model.eval()


@pytest.mark.parametrize('norm, eps, rel', [(math.inf, 0.05, 1e-6), (2, 0.3, 0.11)])
def test_pgd_finds_the_worst_case_of_a_linear_model(norm, eps, rel):
    """The margin z_0 - z_1 = 2 <w, x> is smallest at x - eps sign(w) (L-infinity: exact after 10
    sign steps of eps/5 from any start in the box) or x - eps w/|w| (L2). For L2 the 10 projected
    steps of eps/5 only turn delta towards -w: in the plane of delta and w the angle follows
    tan t' = sin t / (cos t + 1/5), which from the worst start on the sphere leaves cos t = 0.890
    after 10 steps, so the margin drop is at least 89% of 2 eps |w| and never above it."""
    torch.manual_seed(1)
    w = torch.randn(12)
    model = two_class_linear(w)
    x, y = 0.3 + 0.4 * torch.rand(32, 12), torch.zeros(32, dtype=torch.long)
    adv = build_attack('pgd', eps, norm, 2)(model, x, y)
    drop = 2 * ((x - adv) @ w)  # how far the margin fell
    best = 2 * eps * (w.abs().sum() if norm == math.inf else w.norm())
    assert (drop <= best * (1 + 1e-5)).all()
    assert (drop >= best * (1 - rel)).all(), (drop / best).min()


def trained_classifier():
    """An MLP trained on 10 Gaussian blobs in [0, 1]^20 (it fits all 600 points)."""
    generator = torch.Generator().manual_seed(0)
    centres = 0.5 + 0.12 * torch.randn(10, 20, generator=generator)
    y = torch.arange(10).repeat(60)
    x = (centres[y] + 0.05 * torch.randn(len(y), 20, generator=generator)).clamp(0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), x, y


def test_multitarget_is_at_least_as_strong_as_pgd_on_a_trained_model():
    model, x, y = trained_classifier()
    assert (model(x).argmax(1) == y).float().mean() > 0.8
    eps = 0.05
    robust = {}
    for name in ('pgd', 'multitarget'):
        torch.manual_seed(0)
        adv = build_attack(name, eps, math.inf, 10)(model, x, y)
        robust[name] = (model(adv).argmax(1) == y).float().mean().item()
    assert robust['multitarget'] <= robust['pgd'], robust
    # at eps 0.05 PGD leaves 85% and multi-targeted 81% (measured): a regime where both bite
    assert robust['pgd'] < 0.95


def lip_figures(model, x, eps, norm):
    y = model(x).argmax(1).detach()
    return report.split_figures(model, TensorDataset(x, y), build_attack('pgd', eps, norm, 2),
                                eps, norm, 'cpu', 'test')


@pytest.mark.parametrize('norm', [math.inf, 2])
def test_report_lipschitzness_of_a_one_dimensional_linear_map_is_exact(norm):
    """f(x) = (a x, -a x) on one input: every x' gives |f(x) - f(x')|_1 / |x - x'| = 2 |a|
    (up to the 1e-6 shift of the denominator), whatever the search does."""
    model = two_class_linear(torch.tensor([-3.7]))
    figures = lip_figures(model, 0.2 + 0.6 * torch.rand(30, 1), 0.05, norm)
    assert figures['lip_max'] == pytest.approx(7.4, rel=1e-3)
    assert figures['lip_as_published'] == pytest.approx(7.4, rel=1e-3)


def test_report_lipschitzness_of_a_linear_map_reaches_its_analytic_value():
    """f(x) = (<s, x>, -<s, x>) with s in {-1/2, 1/2}^12: over the L-infinity box the ratio
    ||f(x) - f(x')||_1 / ||x - x'||_inf peaks at 2 ||s||_1 = 12 on the corner x + eps sign(s).
    With eps 0.01 the ten steps of 0.003 reach the corner, after which sign steps hover within one
    step of it, so the ascent ends between (1 - 0.003/0.01) = 70% of the peak and the peak (it
    measured 94%); the published descent ends far lower."""
    torch.manual_seed(2)
    s = 0.5 * (torch.randint(0, 2, (12,)) * 2.0 - 1.0)
    figures = lip_figures(two_class_linear(s), 0.3 + 0.4 * torch.rand(40, 12), 0.01, math.inf)
    assert 12.0 * 0.7 <= figures['lip_max'] <= 12.0 * (1 + 1e-3)
    assert figures['lip_as_published'] < 0.5 * figures['lip_max']
