"""README's Extending section, followed literally: a toy activation added with one registration call
is bounded soundly, masked, counted in the metrics columns and projected after optimiser steps; a
toy layer type (one ConvLike class, one register_layer call) is bounded with guaranteed norms."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
import local_bound as lb
from models import ConvLike, Flatten
from settings import CERTIFIED, TRAINING


class UnitClamp(nn.Module):
    """clamp(x, 0, ceiling) with a learnable per-neuron ceiling (kept >= 0.1 after every step)."""

    def __init__(self, features):
        super().__init__()
        self.ceiling = nn.Parameter(torch.ones(1, features))

    def forward(self, x):
        return torch.minimum(x.clamp(min=0), self.ceiling)


def clamp_fixed(layer, lower, upper):
    return (upper <= 0) | (lower >= layer.ceiling)


@pytest.fixture
def registered():
    lb.register_activation(UnitClamp, lb.monotone_rule(lambda layer, t: layer(t), clamp_fixed),
                           project=lambda layer: layer.ceiling.clamp_(min=0.1))
    yield
    del lb.RULES[UnitClamp], lb.ACTIVATIONS[UnitClamp]


def toy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 24), UnitClamp(24), nn.Linear(24, 24), UnitClamp(24), nn.Linear(24, 3))


def test_a_registered_activation_is_bounded_soundly(registered):
    model = toy_model()
    x = torch.rand(64, 8)
    y = model(x).argmax(1)
    eps = 0.05
    out = lb.bound_outputs(model, x, y, eps, CERTIFIED.replace(exact_below=0))
    assert set(out.varying) == {1, 3} and (out.varying[1] < 1).any()   # some neurons are fixed
    # the worst-case logits are never beaten by points of the ball
    direction = torch.randn(200, *x.shape)
    points = x + eps * direction / direction.flatten(2).norm(dim=2, keepdim=True) * torch.rand(200, 64, 1)
    with torch.no_grad():
        logits = model(points.flatten(0, 1)).view(200, 64, 3)
    gap = logits - logits.gather(2, y.view(1, -1, 1).expand(200, -1, 1))
    worst_gap = out.worst - out.worst.gather(1, y.view(-1, 1))
    assert (gap.amax(0) <= worst_gap + 1e-5).all()
    certified = lb.certified_predictions(out, y)
    assert certified.any()
    adv = attacks.pgd(model, x[certified], y[certified], eps, norm=2, steps=50, step_size=eps / 4)
    assert (attacks.margins(model, adv, y[certified]) > 0).all()


def test_a_registered_activation_gets_metrics_columns_and_projection(registered):
    model = toy_model()
    assert lb.activation_layers(model) == [1, 3]
    with torch.no_grad():
        model[1].ceiling.fill_(-1.0)
    lb.project_parameters(model)
    assert (model[1].ceiling == 0.1).all()
    worst = lb.worst_case_logits(model, torch.rand(4, 8), torch.tensor([0, 1, 2, 0]), 0.1, TRAINING)
    worst.sum().backward()
    assert model[3].ceiling.grad is not None


def test_an_unregistered_activation_is_refused():
    model = toy_model()
    with pytest.raises(lb.BoundError, match='layer 1 .UnitClamp.: no bound rule'):
        lb.certify(model, torch.rand(2, 8), torch.tensor([0, 1]), 0.1)


class WeightNormConv(ConvLike):
    """A toy layer type, added as the README says (one class, one registration): a Conv2d whose
    weight is ``g v / ||v||`` per output channel (weight normalisation), computed from its parts."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.g = nn.Parameter(torch.full((conv.out_channels, 1, 1, 1), 1.5))

    @property
    def weight(self):
        v = self.conv.weight
        return self.g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    @property
    def bias(self):
        return self.conv.bias


@pytest.fixture
def weight_norm_registered():
    lb.register_layer(WeightNormConv)
    yield
    del lb.RULES[WeightNormConv], lb.OPERATORS[WeightNormConv]


def weight_norm_net():
    torch.manual_seed(3)
    return nn.Sequential(WeightNormConv(nn.Conv2d(1, 3, 3, padding=1)), nn.ReLU(), Flatten(), nn.Linear(48, 3)).double()


def test_a_new_layer_type_is_one_class_and_one_registration(weight_norm_registered):
    """Bounded with guaranteed norms of its computed weight: at an eps where every neuron varies the
    local bound is the float64 SVD of the explicit operator; certificates survive PGD."""
    net = weight_norm_net()
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    basis = torch.eye(16, dtype=torch.float64).view(16, 1, 4, 4)
    explicit = F.conv2d(basis, net[0].weight.detach(), padding=1).flatten(1).t()
    expected = float(torch.linalg.matrix_norm(explicit, ord=2))
    local = lb.local_lipschitz(net, x[:1], 1e3)
    assert expected <= float(local[0]) <= expected * (1 + 1e-6)
    y = net(x).argmax(1)
    certified = lb.certify(net, x, y, 0.05)
    assert certified.any()
    adversarial = attacks.pgd(net, x, y, 0.05, norm=2, steps=30, restarts=2, clip=None)
    assert (net(adversarial).argmax(1)[certified] == y[certified]).all()


def test_an_unregistered_layer_type_is_refused_in_one_line():
    with pytest.raises(lb.BoundError, match=r'layer 0 \(WeightNormConv\): no bound rule'):
        lb.certify(weight_norm_net(), torch.rand(2, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1]), 0.1)
