"""Deciding a certificate: the guaranteed local and refined products checked step by step until
each example is decided, the rigorous last-layer decision (weak duality, rounding covered), the
estimate presets' worst-case column and the margin rules."""
import math
from dataclasses import dataclass

import torch

import guaranteed
from bound_pass import propagate
from composition import affine_input_shapes, composed, operation_count
from last_layer import dual_bound, exact_solution, label_column, translate
from norm_providers import GuaranteedNorms, failure_events, fresh_starts, global_norm_bounds
from rounding import down, float64_copy, slack_factor, up, up_product
from rules import BoundState


def guaranteed_refined_product(model, x, y, eps, settings, index=None):
    """Guaranteed refined products and label columns, decided round by round (``anytime_decisions``).

    Round k runs the whole refined pass with every per-sample norm the upper bound after
    ``check_steps(settings.sniter)[k]`` Lanczos steps (fresh starts seeded by ``settings.seed`` and
    the example ``index``, the same in every round), for the samples still undecided; its estimates
    are the same runs' Ritz values. Every bound is one check of one norm, so the failure budget is
    that of ``guaranteed_local_product``. Returns (product [B] float64, label column or None, norms,
    the BoundState of every sample's deciding round, assembled, certified [B] bool or None)."""
    batch = x.size(0)
    starts = fresh_starts(affine_input_shapes(model, x.shape[1:]), batch, index, settings.seed, x.device)
    global_norms = global_norm_bounds(model, x.shape[1:], settings)
    checks = guaranteed.check_steps(settings.sniter)
    merged = [None]

    def measure(k, remaining):
        sub_starts = {i: u[remaining] for i, u in starts.items()}
        state = propagate(model, x[remaining], eps[remaining], settings, global_norms, starts=sub_starts,
                          steps=checks[k])
        ones = torch.ones(len(remaining), dtype=torch.float64, device=x.device)
        high = math.prod((rec.sigma.double() for rec in state.records), start=ones)
        low = math.prod(state.pass_norms.estimates.values(), start=ones)
        return Round(low, high, {rec.index: rec.sigma.double() for rec in state.records}, state, state,
                     state.radius, rigorous_radius(eps[remaining], low, len(state.records)))

    def keep(state, rows, done):
        merged[0] = _merged(merged[0], state, rows, done, batch)

    last = float64_copy(list(model)[-1])
    product, column, norms, certified = anytime_decisions(measure, len(checks), batch, y, last, settings,
                                                          x.device, keep)
    return product, column, norms, merged[0], certified


@dataclass
class Round:
    """What one round of a guaranteed product gives for the samples still undecided: the products
    of the estimates (``low``) and of the upper bounds (``high``), every layer's upper bound, the
    pass's state (records, layout) and the penultimate state the last layer reads, and the radii at
    the last layer implied by ``high`` (an upper bound, rounding covered) and by ``low``."""
    low: torch.Tensor
    high: torch.Tensor
    norms: dict
    state: object
    decision_state: object
    radius_high: torch.Tensor
    radius_low: torch.Tensor


def anytime_decisions(measure, rounds, batch, y, last, settings, device, keep=None):
    """The one decision loop of the guaranteed local and refined products.

    ``measure(k, remaining)`` gives the ``Round`` k of the samples ``remaining``. A sample stops once
    the upper bounds certify it (``rigorous_decision`` at ``radius_high``), or once the estimates do
    not either (the converged norms lie between the two), else at the last round; ``y`` None: once
    its product's bound is within ``settings.tol`` (default 1e-2) of its estimate. ``keep(state,
    rows, done)`` sees each round's decided samples. Returns (product [B] float64: the upper bounds'
    product of each sample's deciding round, label column [B, C] or None, {layer key: upper bound
    [B]}, certified [B] bool or None)."""
    product = torch.zeros(batch, dtype=torch.float64, device=device)
    column = None if y is None else torch.zeros(batch, last.out_features, dtype=torch.float64, device=device)
    certified = None if y is None else torch.zeros(batch, dtype=torch.bool, device=device)
    norms = {}
    remaining = torch.arange(batch, device=device)
    for k in range(rounds):
        found = measure(k, remaining)
        last_round = k + 1 == rounds
        if y is None:
            done = torch.full_like(found.high, last_round, dtype=torch.bool) | _settled(
                found.high, found.low, found.state, settings)
        else:
            holds, column_high, done = _decided(last, y[remaining], found.decision_state, found.radius_high,
                                                found.radius_low, last_round)
            column[remaining[done]] = column_high[done]
            certified[remaining[done]] = holds[done]
        product[remaining[done]] = found.high[done]
        for key, upper in found.norms.items():
            norms.setdefault(key, torch.zeros(batch, dtype=torch.float64, device=device))[remaining[done]] = upper[done]
        if keep is not None:
            keep(found.state, remaining[done], done)
        remaining = remaining[~done]
        if not remaining.numel():
            break
    return product, column, norms, certified


def _decided(last, y, state, radius_high, radius_low, last_check):
    """(certified, label column, done) at one check: certified by the upper bounds' radius, done
    when certified, when the estimates' radius does not certify either (the converged norms lie
    between the two), or at the last check."""
    bound = _GapBound(last, y, state)
    holds, column = bound.decide(radius_high)
    hopeless = ~bound.decide(radius_low)[0]
    return holds, column, holds | hopeless | last_check


def _merged(merged, state, rows, done, batch):
    """The BoundState of every decided sample: ``state``'s rows ``done`` written at ``rows``."""
    if merged is None:
        empty = lambda t: t.new_zeros(batch, *t.shape[1:])  # noqa: E731
        merged = BoundState(empty(state.centre), empty(state.radius), empty(state.lower), empty(state.upper),
                            records=state.records, varying={i: empty(v) for i, v in state.varying.items()},
                            centre_err=empty(state.centre_err))
    for name in ('centre', 'radius', 'lower', 'upper', 'centre_err'):
        getattr(merged, name)[rows] = getattr(state, name).detach()[done]
    for i, fraction in state.varying.items():
        merged.varying[i][rows] = fraction[done]
    return merged


# A product below this fraction of the global one is settled whatever its relative precision (a
# network whose masks leave almost nothing: estimates near 0 never come within a relative tolerance).
NEGLIGIBLE = 1e-6


def combined(state, bounds, batch, device):
    """(low, high) products [batch] of ``bounds`` ({layer key: (estimate, upper bound)}): in record
    order along a plain chain, by ``composed`` along one with residual blocks."""
    ones = torch.ones(batch, dtype=torch.float64, device=device)
    if state.layout is not None:
        return tuple(composed(state.layout, {k: b[side] for k, b in bounds.items()}) * ones for side in (0, 1))
    return (math.prod((b[0] for b in bounds.values()), start=ones),
            math.prod((b[1] for b in bounds.values()), start=ones.clone()))


def factor_count(state):
    """The roundings in the product of a pass's norms (``rigorous_radius`` covers them)."""
    return len(state.records) if state.layout is None else operation_count(state.layout)


def global_bound(state):
    """The product of the global norms the pass recorded (``composed`` with residual blocks)."""
    if state.layout is not None:
        return composed(state.layout, {rec.index: rec.global_sigma for rec in state.records})
    return math.prod(rec.global_sigma for rec in state.records) if state.records else 1.0


def _settled(high, low, state, settings):
    """Bool: the product's upper bound ``high`` is within ``settings.tol`` (default 1e-2) of its
    estimate ``low``, or negligible against the product of the global norms."""
    global_product = float(global_bound(state))
    return (high <= low * (1 + (settings.tol or 1e-2))) | (high <= NEGLIGIBLE * global_product)


def _rows_of(state, rows):
    """The penultimate centre and box of ``rows`` (what the last layer reads)."""
    err = None if state.centre_err is None else state.centre_err[rows]
    return BoundState(state.centre[rows], state.radius[rows], state.lower[rows], state.upper[rows], centre_err=err)


def _float_above(sigma):
    """A float at least the number that the tensor ``sigma`` holds rounded to its dtype (the next
    representable value above it): a float32 global norm is a float64 upper bound rounded to nearest."""
    return float(torch.nextafter(sigma.detach(), sigma.new_tensor(math.inf)))


def guaranteed_local_product(state, last, y, eps, settings, index=None):
    """Guaranteed per-sample products and label columns, decided check by check (``anytime_decisions``).

    At each check (``guaranteed.check_steps``) every layer's norm has an estimate and an upper
    bound (``GuaranteedNorms``), composed along the chain (``combined``). ``state`` is a rigorous
    pass's and ``last`` the float64 copy of the last layer (``rigorous_decision``). Returns
    (product [B], label column [B, C] float64 or None, norms, certified [B] bool or None).
    """
    batch, device = state.centre.size(0), state.centre.device
    checks = guaranteed.check_steps(settings.sniter)
    delta = settings.failure_prob / failure_events(settings, len(state.records))
    shapes = {rec.index: rec.op.in_shape for rec in state.records}
    runs = GuaranteedNorms(fresh_starts(shapes, batch, index, settings.seed, device), settings, batch)
    for rec in state.records:
        runs.add(rec, cap=_float_above(rec.global_sigma))     # a masked norm is at most the plain one
    factors = factor_count(state)

    def measure(k, remaining):
        bounds = runs.check(checks[k], delta)
        low, high = combined(state, bounds, len(remaining), device)
        return Round(low, high, {i: upper for i, (_, upper) in bounds.items()}, state,
                     _rows_of(state, remaining) if y is not None else None,
                     rigorous_radius(eps[remaining], high, factors), rigorous_radius(eps[remaining], low, factors))

    return anytime_decisions(measure, len(checks), batch, y, last, settings, device,
                             keep=lambda _, rows, done: runs.keep(~done))


def worst_case_column(last, y, state, radius, settings):
    """The label column of the worst-case translation [B, C] at the last layer ``last`` for the
    penultimate ``state`` and per-sample ``radius`` (``last_layer.label_column`` with ``settings``)."""
    return label_column(last.weight, y, state, radius, settings.opt_iter, layout=settings.layout,
                        translation=settings.translation)


def rigorous_decision(last, y, state, radius):
    """(certified bool [B], label column [B, C] float64) from a rigorous pass's penultimate
    ``state`` (float64, with ``centre_err``), the float64 copy ``last`` of the last layer and
    ``radius`` [B], an upper bound of the radius of the ball around the real centre's image.

    For ``x'`` in the input ball, ``f_j(x') - f_y(x') = <w, c* + d> + b_j - b_y`` with
    ``w = W_j - W_y``, ``c*`` the real penultimate centre (within ``centre_err`` of the computed
    one) and ``d`` in the ball of ``radius`` and in the box relative to ``c*``. The gap is bounded
    by ``<w, c> + |w| . centre_err + (b_j - b_y)``, plus the rounding of those sums, plus the dual
    bound of ``max <w, d>`` over the widened relative box (``last_layer.dual_bound``). Certified:
    every gap bound is finite and below 0 (the clean prediction is then right too). The column is
    the gap bound minus the computed ``z_j - z_y``, so that ``translate`` gives ``z_y + gap``."""
    return _GapBound(last, y, state).decide(radius)


class _GapBound:
    """The radius-free part of ``rigorous_decision`` (differences of label rows, the centre's sums
    and their rounding, the relative box), computed once for the several radii of a check."""

    def __init__(self, last, y, state):
        weight, bias = last.weight.detach(), last.bias
        label_rows = weight[y]
        self.y, self.classes = y, weight.size(0)
        self.w = weight.unsqueeze(0) - label_rows.unsqueeze(1)                       # [B, C, h]
        c, err = state.centre, state.centre_err
        bias_gap = 0.0 if bias is None else bias.detach().unsqueeze(0) - bias.detach()[y].unsqueeze(1)
        bias_size = 0.0 if bias is None else bias.detach().abs().unsqueeze(0) + bias.detach()[y].abs().unsqueeze(1)
        self.dot = (self.w * c.unsqueeze(1)).sum(-1) + bias_gap
        spread = (self.w.abs() * err.unsqueeze(1)).sum(-1)
        size = ((weight.abs().unsqueeze(0) + label_rows.abs().unsqueeze(1))
                * (c.abs() + err).unsqueeze(1)).sum(-1) + bias_size
        slack = slack_factor(weight.size(1))
        self.fixed = self.dot + spread * (1 + slack) + slack * size
        self.low = torch.clamp(down(down(state.lower - c) - err), max=0).unsqueeze(1)
        self.high = torch.clamp(up(up(state.upper - c) + err), min=0).unsqueeze(1)

    def decide(self, radius):
        """(certified [B], label column [B, C]) at ``radius`` [B] (see ``rigorous_decision``)."""
        radius = radius.double()
        _, lam = exact_solution(self.w, self.low, self.high, radius)
        gap = up(self.fixed + dual_bound(self.w, self.low, self.high, radius, lam))
        own = torch.arange(self.classes, device=self.y.device) == self.y.unsqueeze(1)
        gap = torch.where(own, torch.zeros_like(gap), gap)
        others = torch.where(own, torch.full_like(gap, -math.inf), gap)
        certified = torch.isfinite(gap).all(dim=1) & (others.max(dim=1).values < 0)
        return certified, gap - self.dot


def rigorous_radius(eps, product, factors):
    """An upper bound of ``eps * product`` (float64; ``product`` of ``factors`` rounded norms)."""
    return up_product(eps.double(), product.double() * (1 + slack_factor(factors)))


def certifies_with(logits, y, column):
    """Bool [B]: the clean prediction is right and the worst-case logits from ``column`` certify
    (finite, label first by the margin)."""
    worst = translate(logits, y, column)
    return (correct_predictions(logits, y) & torch.isfinite(column).all(dim=1)
            & strictly_first(worst, y, MARGIN_RTOL))


MARGIN_RTOL = 1e-5


def strictly_first(scores, y, rtol=0.0):
    """Bool [B]: every score of the row is finite and ``scores[y]`` beats every other one by more
    than ``rtol * (1 + |scores[y]|)`` (a tie, NaN or inf never counts)."""
    finite = torch.isfinite(scores).all(dim=1)
    own = scores.gather(1, y.view(-1, 1)).squeeze(1)
    others = scores.scatter(1, y.view(-1, 1), float('-inf')).max(dim=1).values
    return finite & (own - others > rtol * (1.0 + own.abs()))


def correct_predictions(logits, y):
    """Bool [B]: the clean prediction is the label (finite logits, no tie)."""
    return strictly_first(logits, y)
