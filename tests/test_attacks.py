"""attacks.py: the one PGD (L2 and L-infinity), multi-targeted PGD, random search."""
import math

import pytest
import torch
import torch.nn as nn

import attacks

ORDERS = ['project_clip', 'clip_project']
STARTS = [None, 'uniform', 'normal', 'image']


def _linear_two_class(d=12, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2))
    return model.eval()


@pytest.mark.parametrize('norm', [2, math.inf])
@pytest.mark.parametrize('order', ORDERS)
@pytest.mark.parametrize('start', STARTS)
def test_result_stays_in_the_ball_and_in_the_unit_box(norm, order, start):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    x, y = torch.rand(20, 3, 4, 4), torch.randint(0, 5, (20,))
    eps = 0.3 if norm == 2 else 0.05
    adv = attacks.pgd(model, x, y, eps, norm=norm, steps=7, step_size=eps / 2, random_start=start,
                      order=order, restarts=2)
    delta = (adv - x).flatten(1)
    size = delta.norm(dim=1) if norm == 2 else delta.abs().amax(dim=1)
    assert torch.all(size <= eps * (1 + 1e-5))
    assert adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize('norm', [2, math.inf])
def test_finds_the_analytic_worst_case_of_a_linear_model(norm):
    """Margin z_0 - z_1 = <w, x> + c is minimised over the ball by x - eps w/|w| (L2) or
    x - eps sign(w) (L-infinity); no clipping so the optimum is exact."""
    model = _linear_two_class()
    x, y = torch.randn(8, 12), torch.zeros(8, dtype=torch.long)
    w = model[1].weight[0] - model[1].weight[1]
    eps = 0.5 if norm == 2 else 0.1
    adv = attacks.pgd(model, x, y, eps, norm=norm, steps=30, step_size=eps / 4, clip=None)
    shift = eps * w / w.norm() if norm == 2 else eps * w.sign()
    expected = attacks.margins(model, x - shift, y)
    assert torch.allclose(attacks.margins(model, adv, y), expected, atol=1e-4)


def test_targeted_attack_reaches_the_target_on_a_linear_model():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 4)).eval()
    x, y = torch.randn(16, 6), torch.zeros(16, dtype=torch.long)
    target = torch.full_like(y, 3)
    adv = attacks.pgd(model, x, y, 50.0, norm=2, steps=50, step_size=5.0, targets=target, clip=None)
    assert (model(adv).argmax(1) == 3).all()


def test_multitarget_is_at_least_as_strong_as_untargeted():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 6)).eval()
    x = torch.rand(64, 20)
    y = model(x).argmax(1).detach()
    eps = 0.4
    plain = attacks.pgd(model, x, y, eps, norm=2, steps=20, step_size=eps / 10)
    multi = attacks.multitarget_pgd(model, x, y, eps, norm=2, steps=20)
    fooled_plain = (model(plain).argmax(1) != y).sum()
    fooled_multi = (model(multi).argmax(1) != y).sum()
    assert fooled_multi >= fooled_plain
    assert torch.all((multi - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5))


def test_random_search_margin_is_the_margin_of_its_point():
    model = _linear_two_class()
    x, y = torch.rand(10, 12), torch.ones(10, dtype=torch.long)
    points, margin = attacks.random_search(model, x, y, 0.2, samples=30)
    assert torch.allclose(attacks.margins(model, points, y), margin)
    assert torch.all(margin <= attacks.margins(model, x, y) + 1e-6)


def test_the_model_mode_is_left_as_found():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 2)).train()
    attacks.pgd(model, torch.rand(5, 4), torch.zeros(5, dtype=torch.long), 0.1, steps=2)
    assert model.training


def test_bad_norm_is_a_clear_error():
    with pytest.raises(ValueError, match='norm'):
        attacks.parse_norm(3)
