"""Activations: their bound rules (ReLU, ReLUθ, clipped MaxMin, any monotone one), the probe checks
a registered activation must pass, and the registry (``register_activation``, README "Extending")."""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from composition import keyed_layers
from interval_steps import larger, smaller
from models import ClampGroupSort, ReLU_x, relu_x
from rounding import down, up
from rules import RULES, activation_step, count_varying
from settings import BoundError


def relux_rule(layer, index, state, options):
    theta = layer.threshold
    fixed = (state.lower > theta) | (state.upper <= 0)          # a NaN bound is never fixed
    mask = (~fixed).to(state.centre.dtype)
    sparsity = 0.0
    sp_thres = options.settings.sp_thres
    if sp_thres is not None:
        sparsity = F.relu(state.upper).mean() + sp_thres * F.relu(theta - state.lower).mean()
    return activation_step(index, state, lambda t: relu_x(t, theta), mask, sparsity, theta=theta, options=options)


def relu_rule(layer, index, state, options):
    mask = (~(state.upper <= 0)).to(state.centre.dtype)      # a NaN bound is never fixed
    sparsity = F.relu(state.upper).mean() if options.settings.sp_thres is not None else 0.0
    return activation_step(index, state, F.relu, mask, sparsity, theta=None, options=options)


def monotone_rule(act, fixed):
    """The bound rule of a non-decreasing elementwise activation (for ``register_activation``).

    ``act(layer, t)`` computes the activation; ``fixed(layer, lower, upper)`` is a bool tensor of
    the neurons whose output is the same for every pre-activation in [lower, upper] (a neuron with
    a NaN or infinite bound is never taken as fixed)."""
    def rule(layer, index, state, options):
        check_activation(layer, act, fixed, state.centre.shape[1:], f'layer {index} ({type(layer).__name__})',
                         state.centre)
        finite = torch.isfinite(state.lower) & torch.isfinite(state.upper)
        mask = (~(fixed(layer, state.lower, state.upper) & finite)).to(state.centre.dtype)
        # a copy: an ``act`` that works in place must not change the pass's tensors (a residual
        # block's other branch reads the same centre)
        return activation_step(index, state, lambda t: act(layer, t.clone()), mask, options=options, exact=False)
    rule.act, rule.fixed = act, fixed
    return rule


#
# What the pass assumes of an elementwise activation and can test on points: non-decreasing,
# 1-Lipschitz, computed by ``act`` exactly as by the module's forward, and constant where ``fixed``
# says so. Checked at registration (on a default-constructed instance, when the type has one) and
# at every pass on the actual layer (a few thousand points: cheap, so nothing is remembered).
# Between the probe points nothing is checked: a rule that is wrong only there is not caught.

# Probe values: dense around 0, then out to +-1e6 (sorted, float64).
PROBE_VALUES = torch.cat([-torch.logspace(6, 0.5, 32, dtype=torch.float64),
                          torch.linspace(-3, 3, 193, dtype=torch.float64),
                          torch.logspace(0.5, 6, 32, dtype=torch.float64)])
PROBE_ROWS = 4                  # at least this many probe rows: every neuron sees several intervals
PROBE_RTOL, PROBE_ATOL = 1e-5, 1e-6


def probe_intervals(shape, like):
    """(low, mid, high, low + h) probe tensors [K, *shape] in ``like``'s dtype and device: every
    neuron gets consecutive probe values as [low, high] (neurons take the intervals in turn, so each
    channel of a conv layer sees all of them), mid their midpoint, h a small step."""
    count, intervals = math.prod(shape), len(PROBE_VALUES) - 1
    rows = max(PROBE_ROWS, -(-intervals // max(count, 1)))
    which = torch.arange(rows * count) % intervals
    values = PROBE_VALUES.to(like.device)
    low, high = values[which.to(like.device)], values[which.to(like.device) + 1]
    step = 1e-3 * (1 + low.abs())
    as_probe = lambda t: t.to(like.dtype).view(rows, *shape)  # noqa: E731
    return as_probe(low), as_probe((low + high) / 2), as_probe(high), as_probe(low + step)


def _equal(a, b):
    """Elementwise: equal up to float rounding (``PROBE_RTOL``, ``PROBE_ATOL``); NaN never is."""
    return torch.isclose(a, b, rtol=PROBE_RTOL, atol=PROBE_ATOL)


def _close(a, b):
    return bool(_equal(a, b).all())


@torch.no_grad()
def check_activation(layer, act, fixed, shape, where, like):
    """BoundError (one line naming ``where``) unless, on the probe points of ``probe_intervals``,
    ``act(layer, t)`` equals ``layer(t)``, is non-decreasing with slope at most 1, and is constant
    on every probe interval ``fixed(layer, lower, upper)`` declares fixed."""
    points = dict(zip(('low', 'mid', 'high', 'near'), probe_intervals(tuple(shape), like)))
    values = {name: act(layer, t.clone()) for name, t in points.items()}
    if not all(_close(values[name], layer(t.clone())) for name, t in points.items()):
        raise BoundError(f"{where}: the rule's act(layer, t) differs from the layer's own forward (the pass "
                         'would bound another function)')
    for a, b in (('low', 'mid'), ('mid', 'high'), ('low', 'near')):
        rise, step = values[b] - values[a], points[b] - points[a]
        slack = PROBE_ATOL + PROBE_RTOL * (values[a].abs() + values[b].abs())
        if not (rise >= -slack).all():
            raise BoundError(f'{where}: the activation decreases between probe points (the pass models '
                             'non-decreasing activations)')
        if not (rise <= step * (1 + PROBE_RTOL) + slack).all():
            raise BoundError(f'{where}: the activation is steeper than slope 1 between probe points (the pass '
                             'assumes 1-Lipschitz activations)')
    declared = fixed(layer, points['low'], points['high']).expand_as(points['low'])
    constant = _equal(values['low'], values['high']) & _equal(values['low'], values['mid'])
    if (declared & ~constant).any():
        raise BoundError(f'{where}: fixed(layer, lower, upper) declares neurons fixed on probe intervals where '
                         'the activation changes')


def _default_instance(cls):
    """``cls()`` when the type can be built without arguments, else None."""
    try:
        return cls()
    except (TypeError, ValueError, RuntimeError):
        return None


def maxmin_rule(layer, index, state, options):
    """Box ``max(act(l), act(m - r)) .. min(act(u), act(m + r))`` of the clipped MaxMin ``act``.

    Computed without applying ``act`` five times: the clips commute with the intersection
    (``max(min(A, t), min(B, t)) = min(max(A, B), t)``) and ``act(m -/+ r)`` before clipping is
    ``(max(a, b) -/+ r, min(a, b) -/+ r)`` for the channel halves a, b of m. Same values.
    """
    r = state.radius.view(-1, *([1] * (state.centre.dim() - 1)))
    (low_a, low_b), (up_a, up_b), (c_a, c_b) = _halves(state.lower), _halves(state.upper), _halves(state.centre)
    c_high, c_low = larger(c_a, c_b), smaller(c_a, c_b)
    centre_err = state.centre_err
    if options.rigorous:        # max and min are 1-Lipschitz coordinate-wise: a pair's error is the larger one
        err = torch.maximum(*_halves(state.centre_err))
        centre_err, reach = torch.cat([err, err], dim=1), up(err + r)
        below = lambda t: down(t - reach)  # noqa: E731
        above = lambda t: up(t + reach)  # noqa: E731
    else:
        below, above = (lambda t: t - r), (lambda t: t + r)
    lower_high = larger(larger(low_a, low_b), below(c_high))
    lower_low = larger(smaller(low_a, low_b), below(c_low))
    upper_high = smaller(larger(up_a, up_b), above(c_high))
    upper_low = smaller(smaller(up_a, up_b), above(c_low))
    top, bottom = layer.max, layer.min
    lower = torch.cat([smaller(lower_high, top), larger(lower_low, bottom)], dim=1)
    upper = torch.cat([smaller(upper_high, top), larger(upper_low, bottom)], dim=1)
    centre = torch.cat([smaller(c_high, top), larger(c_low, bottom)], dim=1)
    # a MaxMin mixes its pairs: the tensor no longer indexes the previous layer's outputs (owner None)
    new = replace(state, centre=centre, lower=lower, upper=upper, mask=None, owner=None, centre_err=centre_err)
    high_lower, low_upper = _halves(new.lower)[0], _halves(new.upper)[1]
    fixed = torch.cat([high_lower >= layer.max, low_upper <= layer.min], dim=1)
    new.mask = (~fixed).to(state.centre.dtype)
    count_varying(new, index, new.mask)
    if options.settings.sp_thres is not None:
        new.sparsity = new.sparsity + F.relu(layer.max - high_lower).mean() + F.relu(low_upper - layer.min).mean()
    return new


def _halves(t):
    """The two channel halves of ``t`` (a MaxMin's pairs)."""
    return t.split(t.size(1) // 2, dim=1)


@dataclass(frozen=True)
class Activation:
    """How the pass and training treat one activation type: its bound rule (which also decides
    the varying mask, hence the metrics' ``varying_<i>`` columns) and what to project after every
    optimiser step (``project(layer)``, e.g. ReLU_x thresholds onto [0, inf); None: nothing)."""
    rule: object
    project: object = None


ACTIVATIONS = {}


def register_activation(cls, rule, project=None):
    """Declare activation module type ``cls``: the one call a new activation needs (README, Extending).

    A ``monotone_rule`` is checked here on a default-constructed instance when ``cls()`` builds one
    whose forward accepts a flat probe (BoundError naming ``cls`` when it fails), and again on every
    actual layer at every pass (``check_activation``)."""
    instance = _default_instance(cls) if hasattr(rule, 'act') else None
    if instance is not None:
        _check_registration(instance, rule)
    RULES[cls] = rule
    ACTIVATIONS[cls] = Activation(rule, project)


def _check_registration(instance, rule):
    """``check_activation`` on a flat probe of a default instance; a forward that cannot take one
    (a parameter of another shape) leaves the check to the pass."""
    where = f'{type(instance).__name__} (registration)'
    try:
        check_activation(instance, rule.act, rule.fixed, (1,), where, torch.zeros(()))
    except BoundError:
        raise
    except (RuntimeError, TypeError, ValueError):
        return


def _nonnegative_threshold(layer):
    layer.threshold.clamp_(min=0.0)


register_activation(ReLU_x, relux_rule, project=_nonnegative_threshold)
register_activation(nn.ReLU, relu_rule)
register_activation(ClampGroupSort, maxmin_rule)


def activation_layers(model):
    """Keys of the registered activation layers of ``model`` (inside residual blocks too)."""
    return [key for key, layer in keyed_layers(model) if type(layer) in ACTIVATIONS]


@torch.no_grad()
def project_parameters(model):
    """Apply every activation's projection (after each optimiser step)."""
    for layer in model.modules():
        spec = ACTIVATIONS.get(type(layer))
        if spec is not None and spec.project is not None:
            spec.project(layer)
