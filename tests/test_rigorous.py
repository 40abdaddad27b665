"""Constructed attacks on the certificate (issue: an adversary who reads the code): masks written
by position, the iterative last layer under a guarantee, float32 rounding of the box, the margin
and the exact solver. Each model here was certified (falsely) before the fix; each test checks the
claim against the real-valued network (float64 or exact rationals at a point of the ball)."""
import math
from decimal import Decimal, getcontext
from fractions import Fraction

import pytest
import torch
import torch.nn as nn

import last_layer
import local_bound as lb
from models import ClampGroupSort, ReLU_x
from settings import CERTIFIED, BoundSettings


def _linear(weight, bias, dtype=torch.float32):
    weight = torch.as_tensor(weight, dtype=dtype)
    layer = nn.Linear(weight.size(1), weight.size(0)).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(torch.as_tensor(bias, dtype=dtype))
    return layer


def _float64_predicts(model, point):
    """The class a float64 copy of ``model`` gives at ``point`` (exact inputs of the real network)."""
    with torch.no_grad():
        return int(lb.float64_copy(model)(point.double()).argmax(1))


# ----------------------------------------------------------------------------- masks by structure

def maxmin_then_relu(kind):
    """Linear -> clipped MaxMin -> ReLU-family -> Linear: the MaxMin's larger output carries 10 x0
    while its smaller one is constant 0, so the ReLU after it is fixed on its *second* coordinate.
    Written by position into the first Linear's rows, that mask dropped the row that varies."""
    first = _linear([[0.0, 0.0], [10.0, 0.0]], [0.0, 0.0])
    maxmin = ClampGroupSort((1,), 100.0, -100.0)
    act = nn.ReLU() if kind == 'relu' else ReLU_x((1, 2), init=100.0)
    last = _linear([[1.0, 0.0], [0.0, 0.0]], [0.0, 5.5])
    return nn.Sequential(first, maxmin, act, last).eval()


@pytest.mark.parametrize('kind', ['relu', 'relux'])
@pytest.mark.parametrize('settings', [CERTIFIED, CERTIFIED.replace(bound='refined')], ids=['local', 'refined'])
def test_a_mask_after_maxmin_never_drops_the_rows_that_vary(kind, settings):
    model = maxmin_then_relu(kind)
    x, y = torch.tensor([[0.6, 0.0]]), torch.tensor([0])
    assert _float64_predicts(model, x) == 0
    assert _float64_predicts(model, torch.tensor([[0.4, 0.0]])) == 1, 'the ball of 0.2 holds a flip'
    assert not lb.certify(model, x, y, 0.2, settings).any()
    assert float(lb.local_lipschitz(model, x, 0.2, settings)) >= 10.0 * (1 - 1e-9)
    assert lb.certify(model, x, y, 0.01, settings).all(), 'vacuous: robust at 0.01 (p stays above 5.5)'


def test_a_conv_maxmin_then_relu_keeps_its_masks_on_its_own_coordinates():
    """The conv form: a channel pair whose larger member varies and whose smaller one is 0."""
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.0, 10.0]).view(2, 1, 1, 1))
        conv.bias.zero_()
    model = nn.Sequential(conv, ClampGroupSort((1, 1, 1), 100.0, -100.0), nn.ReLU(), nn.Flatten(),
                          _linear([[1.0, 0.0], [0.0, 0.0]], [0.0, 5.5])).eval()
    x, y = torch.full((1, 1, 1, 1), 0.6), torch.tensor([0])
    assert _float64_predicts(model, torch.full((1, 1, 1, 1), 0.4)) == 1
    assert not lb.certify(model, x, y, 0.2).any()
    assert lb.certify(model, x, y, 0.01).all()


def test_consecutive_elementwise_activations_combine_their_masks():
    """ReLU then ReLU_x on the same coordinates: a neuron fixed by either is fixed; the output mask
    of the layer before them is the intersection of their varying sets."""
    first = _linear([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], [0.0, 0.0, -1.0])
    relux = ReLU_x((1, 3), init=0.5)
    model = nn.Sequential(first, nn.ReLU(), relux, _linear([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], [0.0, 0.1]))
    x = torch.tensor([[2.0, 0.2]])          # neuron 0 saturates ReLU_x, neuron 2 is dead for ReLU
    state = lb.propagate(model, x, 0.05, CERTIFIED)
    assert state.records[0].out_mask.tolist() == [[0.0, 1.0, 0.0]]


# ----------------------------------------------------------------------------- the last layer

def test_guaranteed_settings_refuse_the_iterative_translation():
    with pytest.raises(ValueError, match='exact'):
        BoundSettings(method='guaranteed', translation='iterative')
    assert CERTIFIED.translation == 'exact'


def decimal_optimum(w, lower, upper, radius):
    """max <w, d> s.t. |d| <= radius, lower <= d <= upper, in 60-digit decimal arithmetic: scan the
    breakpoints of d(lam) = clip(lam w) for the one where |d(lam)| reaches the radius."""
    getcontext().prec = 60
    w, lo, hi = ([Decimal(float(v)) for v in t] for t in (w, lower, upper))
    r2 = Decimal(float(radius)) ** 2
    def d_at(lam):
        return [min(max(lam * wi, li), ui) for wi, li, ui in zip(w, lo, hi)]
    breaks = sorted({(ui / wi if wi > 0 else li / wi) for wi, li, ui in zip(w, lo, hi) if wi != 0})
    prev = Decimal(0)
    for t in breaks + [None]:
        if t is None or sum(v * v for v in d_at(t)) >= r2:
            # on [prev, t] the clipped set is that of the midpoint: solve |d(lam)|^2 = r^2 there
            probe = prev + (t - prev) / 2 if t is not None else prev + 1
            clipped = [(lam_d != probe * wi) for lam_d, wi in zip(d_at(probe), w)]
            fixed = sum(v * v for v, c in zip(d_at(probe), clipped) if c)
            free = sum(wi * wi for wi, c in zip(w, clipped) if not c)
            if free == 0:
                return float(sum(wi * v for wi, v in zip(w, d_at(probe))))
            lam = ((r2 - fixed) / free).sqrt()
            if t is not None:
                lam = min(lam, t)
            return float(sum(wi * v for wi, v in zip(w, d_at(lam))))
        prev = t
    return float(sum(wi * v for wi, v in zip(w, d_at(prev))))


def test_the_dual_bound_is_never_below_the_optimum_where_the_primal_formula_cancels():
    """The clipped coordinates take all but 1e-14 of the ball: ``r^2 - sum c^2`` cancels in float64
    and the square root magnifies it; the dual bound has no such difference."""
    gen = torch.Generator().manual_seed(3)
    worst_primal, checked = 0.0, 0
    for trial in range(40):
        h = 12
        w = torch.rand(h, generator=gen, dtype=torch.float64) + 0.1
        upper = torch.rand(h, generator=gen, dtype=torch.float64) * 1e-3
        lower = -torch.rand(h, generator=gen, dtype=torch.float64)
        upper[-1] = 10.0                                   # one coordinate stays free
        w[-1] = 1e-3                                       # ... and reaches its bound last
        r = math.sqrt(float((upper[:-1] ** 2).sum()) * (1 + 10 ** -(8 + trial % 8)))
        args = (w.view(1, 1, h), lower.view(1, 1, h), upper.view(1, 1, h), torch.tensor([r], dtype=torch.float64))
        primal, lam = last_layer.exact_solution(*args)
        bound = float(last_layer.dual_bound(*args, lam))
        optimum = decimal_optimum(w, lower, upper, r)
        assert bound >= optimum, (trial, bound, optimum)
        assert bound <= optimum + 1e-12 * (1 + abs(optimum)), 'the dual bound should be tight at the primal lam'
        worst_primal = max(worst_primal, optimum - float(primal))
        checked += 1
    assert checked == 40 and worst_primal > 0, 'vacuous: the primal formula never fell below the optimum here'


# ----------------------------------------------------------------------------- floating point

def test_a_neuron_live_by_less_than_float32_rounding_is_not_marked_fixed():
    """x = 1 and eps = 2^-25: float32 rounds 1 + eps to 1, so a box in float32 says the ReLU of
    x - 1 is dead; a weight of 1e9 after it turns that into a flip."""
    model = nn.Sequential(_linear([[1.0]], [-1.0]), nn.ReLU(), _linear([[0.0], [1e9]], [1.0, 0.5])).eval()
    x, y, eps = torch.tensor([[1.0]]), torch.tensor([0]), 2.0 ** -25
    assert float(torch.tensor(1.0) + torch.tensor(eps)) == 1.0, 'the float32 sum rounds'
    assert _float64_predicts(model, torch.tensor([[1.0 + eps]], dtype=torch.float64)) == 1
    for settings in (CERTIFIED, CERTIFIED.replace(bound='refined'), CERTIFIED.replace(bound='global')):
        assert not lb.certify(model, x, y, eps, settings).any(), settings.bound


def test_inputs_far_outside_the_data_range_keep_their_ball():
    """x = 1000, eps = 1e-5: in float32 x +/- eps is x, the box collapses."""
    model = nn.Sequential(_linear([[1.0]], [-1000.0]), nn.ReLU(), _linear([[0.0], [10.0]], [5e-5, 0.0])).eval()
    x, y = torch.tensor([[1000.0]]), torch.tensor([0])
    assert _float64_predicts(model, torch.tensor([[1000.0 + 1e-5]], dtype=torch.float64)) == 1
    assert not lb.certify(model, x, y, 1e-5).any()
    assert lb.certify(model, x, y, 1e-6).all(), 'vacuous: 10 * 1e-6 < 5e-5 is robust'


def _exact_gap_at(layer, x, point):
    """max_{j != y} f_j - f_y of a Linear layer at ``point`` in exact rational arithmetic."""
    weight, bias = layer.weight.detach().double().tolist(), layer.bias.detach().double().tolist()
    z = [sum(Fraction(w) * Fraction(p) for w, p in zip(row, point)) + Fraction(b) for row, b in zip(weight, bias)]
    return z


@pytest.mark.parametrize('scale, cancel', [(3.0, False), (1000.0, True)], ids=['logits-2000', 'sums-cancel'])
def test_the_margin_covers_logit_rounding_at_large_logits(scale, cancel):
    """One Linear layer with logits near 2000 (or small logits from sums of terms near 1000 that
    cancel, where float32 loses 1e-4) and eps tuned so that the true worst gap is within a few
    float32 ulps of 0: a certificate is given only where no point of the ball flips, checked in
    exact arithmetic at the worst point (a point of the ball, shrunk by 1e-12)."""
    gen = torch.Generator().manual_seed(0)
    certified_somewhere = flips = 0
    for trial in range(60):
        weight = torch.randn(2, 4, generator=gen) * scale
        x = torch.rand(1, 4, generator=gen)
        bias = -(weight.double() @ x.double()[0]).float() if cancel else torch.tensor([2000.0, 2000.0])
        layer = _linear(weight, bias + torch.randn(2, generator=gen) * 1e-3)
        with torch.no_grad():
            z = lb.float64_copy(nn.Sequential(layer))(x.double())[0]
        y = int(z.argmax())
        w = (layer.weight[1 - y] - layer.weight[y]).detach().double()
        margin = float(z[y] - z[1 - y])
        eps = margin / float(w.norm()) * (1 + (trial % 7 - 3) * 1e-7)
        cert = bool(lb.certify(nn.Sequential(layer), x, torch.tensor([y]), eps))
        point = (x.double()[0] + eps * (1 - 1e-12) * w / w.norm()).tolist()
        exact = _exact_gap_at(layer, x, point)
        flipped = exact[1 - y] >= exact[y]
        flips += flipped
        certified_somewhere += cert
        assert not (cert and flipped), (trial, eps)
    assert flips > 0 and certified_somewhere > 0, 'vacuous: the tuned radii should hit both sides'


def test_a_rigorous_pass_encloses_the_real_centre_and_ball():
    """Boxes of a rigorous pass contain the float64 image of points of the ball and the centre's
    error bound holds against a float64 recomputation of the float32 model (a small CNN)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                          ReLU_x((1, 4, 2, 2), 0.7), nn.Flatten(), nn.Linear(16, 6), nn.ReLU(),
                          nn.Linear(6, 3)).eval()
    x = torch.rand(3, 2, 5, 5) * 1000          # far from [0, 1]: rounding is large in absolute terms
    eps = 1e-3
    state = lb.propagate(model, x, eps, CERTIFIED)
    model64 = lb.float64_copy(model)
    with torch.no_grad():
        centre = model64[:-1](x.double())
        assert torch.all((centre - state.centre).abs() <= state.centre_err)
        for _ in range(20):
            d = torch.randn_like(x, dtype=torch.float64)
            d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
            out = model64[:-1](x.double() + d)
            assert torch.all(out >= state.lower) and torch.all(out <= state.upper)
