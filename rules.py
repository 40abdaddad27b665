"""The bound pass's state and its rules: what flows between layers (``BoundState``), the rule of
each layer type (``RULES``: affine layers, Flatten, residual blocks; activations are registered by
``activations.py``), and the masks tied to the layer whose coordinates they index."""
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn as nn

from composition import composed, operation_count
from interval_steps import BallBoxIntersection, ClippedBallStep
from models import ConvLike, Flatten, Residual
from operators import OPERATORS, ConvOperator, make_operator
from rounding import UNIT_ROUNDOFF, down, rigorous_affine, rigorous_ball_ends, slack_factor, up, up_product, widened, ACTIVATION_ATOL, ACTIVATION_RTOL
from settings import BoundError, BoundSettings
from spectral import global_spectral_norm


@dataclass
class AffineRecord:
    """An affine layer met by the pass, with the masks around it and its global norm; with the
    refined bound's radius refinement also the radius of the ball it received and its per-sample
    norm, taken during the pass (``sigma``; None: taken after the pass)."""
    index: int
    op: object
    global_sigma: torch.Tensor
    in_mask: Optional[torch.Tensor] = None
    out_mask: Optional[torch.Tensor] = None
    radius_in: Optional[torch.Tensor] = None
    sigma: Optional[torch.Tensor] = None


@dataclass
class BoundState:
    """What flows between layers: ball centre and radius, box, and the current varying mask (in the
    coordinates of the current tensor); ``records`` (affine layers met) and ``varying``
    ({activation index: fraction of varying neurons [B]}) accumulate along the pass.

    ``owner`` is the record of the affine layer whose output coordinates the current tensor still
    indexes (only elementwise maps and reshapes since): an elementwise activation's mask becomes
    that layer's output mask. Any other map (a MaxMin mixes its pairs) clears it, so a mask is never
    applied to rows it does not index. ``layout`` is the chain when it holds residual blocks (the
    product then composes by ``composed``; None: a plain chain multiplies). ``centre_err`` (rigorous passes only: docs/certificates.md, "Floating point")
    bounds, per coordinate, how far the computed centre is from the real-valued image of the input."""
    centre: torch.Tensor
    radius: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    mask: Optional[torch.Tensor] = None
    records: list = field(default_factory=list)
    sparsity: torch.Tensor = 0.0
    varying: dict = field(default_factory=dict)
    pass_norms: Optional[object] = None
    owner: Optional[AffineRecord] = None
    centre_err: Optional[torch.Tensor] = None
    layout: Optional[object] = None


@dataclass
class PassOptions:
    """What the layer rules read: the settings, and the guaranteed global norms when the settings
    ask for them ({affine layer index: upper bound of its plain norm}; None: power iteration);
    ``rigorous``: float64 arithmetic with every rounding covered (guaranteed settings; ``rigorous_affine`` and docs/certificates.md, "Floating point")."""
    settings: BoundSettings
    global_norms: Optional[dict] = None
    rigorous: bool = False


def affine_rule(layer, index, state, options):
    """Box of an affine layer: interval arithmetic intersected with the ball-implied box
    ``centre_j +/- r ||W_j||`` (the refined bound's 'rows': ``||W_j D_in||``, docs/method.md §7);
    the ball's radius grows by the layer's global norm."""
    op = make_operator(layer, state.centre.shape[1:])
    masked_rows = 'rows' in options.settings.refines and state.mask is not None
    if options.rigorous:
        rows = op.masked_row_norms(state.mask) if masked_rows else op.row_norms()
        sigma = state.centre.new_tensor(options.global_norms[index])
        lower, upper, centre, centre_err, radius = rigorous_affine(op, rows, state, sigma)
        record = _record(state, index, op, sigma)
        return replace(state, centre=centre, radius=radius, lower=lower, upper=upper, mask=None, owner=record,
                       centre_err=centre_err)
    box_mid = op.affine((state.lower + state.upper) * 0.5)
    box_rad = op.absolute((state.upper - state.lower) * 0.5)
    centre = op.affine(state.centre)
    rows = op.masked_row_norms(state.mask) if masked_rows else op.row_norms()
    ball_rad = state.radius.view(-1, *([1] * (centre.dim() - 1))) * rows
    lower, upper = BallBoxIntersection.apply(box_mid, box_rad, centre, ball_rad)
    if options.global_norms is not None:
        sigma = centre.new_tensor(options.global_norms[index])
    else:
        sigma = global_spectral_norm(op, options.settings.sniter, grad=options.settings.power_grad)
    record = _record(state, index, op, sigma)
    return replace(state, centre=centre, radius=state.radius * sigma, lower=lower, upper=upper, mask=None,
                   owner=record)


def _record(state, index, op, sigma):
    """Append the record of affine layer ``index`` (its input mask is the current one)."""
    record = AffineRecord(index, op, sigma, in_mask=state.mask, radius_in=state.radius)
    state.records.append(record)
    return record


def activation_step(index, state, act, mask, sparsity=0.0, theta=False, options=None, exact=True):
    """Shared part of every elementwise activation rule: box through ``act`` intersected with the
    ball's box; ``mask`` (the varying neurons) becomes the output mask of the affine layer whose
    output coordinates it indexes (``BoundState.owner``), if any.

    For an elementwise non-decreasing ``act``, ``max(act(l), act(m - r)) = act(max(l, m - r))``
    (and likewise for the upper bound), so the intersection is taken before the activation.
    ``theta`` (a threshold tensor, or None for ReLU) selects the fused clip step instead of ``act``.
    In a rigorous pass (``options.rigorous``) the ends are taken with the centre's error, and an
    activation that is not ``exact`` in floating point (a registered one) is widened by its
    assumed rounding; a 1-Lipschitz activation leaves the centre's error as it is, plus that rounding.
    """
    err = state.centre_err
    if options is not None and options.rigorous:
        low, high = rigorous_ball_ends(state)
        lower, upper, centre = act(low), act(high), act(state.centre)
        if not exact:
            lower, upper = widened(lower, -1), widened(upper, 1)
            err = up(err + up(centre.abs() * ACTIVATION_RTOL + ACTIVATION_ATOL))
    elif theta is not False:
        lower, upper, centre = ClippedBallStep.apply(state.lower, state.upper, state.centre, state.radius, theta)
    else:
        r = state.radius.view(-1, *([1] * (state.centre.dim() - 1)))
        lower = act(torch.maximum(state.lower, state.centre - r))
        upper = act(torch.minimum(state.upper, state.centre + r))
        centre = act(state.centre)
    if state.owner is not None:
        _add_out_mask(state.owner, mask)
    count_varying(state, index, mask)
    return replace(state, centre=centre, lower=lower, upper=upper, mask=mask, sparsity=state.sparsity + sparsity,
                   centre_err=err)


def _add_out_mask(record, mask):
    """Mark as fixed the output neurons of ``record``'s layer that ``mask`` (same coordinates, any
    shape) marks fixed: a neuron held constant by any elementwise activation after the layer is
    constant through all of them."""
    mask = mask.reshape(mask.size(0), *record.op.out_shape)
    record.out_mask = mask if record.out_mask is None else record.out_mask * mask


def count_varying(state, index, mask):
    """Record the per-sample fraction of varying neurons of activation ``index``."""
    state.varying[index] = mask.detach().flatten(1).mean(dim=1)


def flatten_rule(layer, index, state, options):
    flat = lambda t: None if t is None else t.reshape(t.size(0), -1)  # noqa: E731
    return replace(state, centre=flat(state.centre), lower=flat(state.lower), upper=flat(state.upper),
                   mask=flat(state.mask), centre_err=flat(state.centre_err))


def sum_rule(layer, index, state, options):
    """A residual block ``shortcut(x) + f(x)``: every branch runs from the block's input (its layers
    keyed ``'index.b.j'``; no owner, since the input feeds several branches), then centres and boxes
    add, and the ball's radius grows by the sum over branches of their global norm products (each
    branch is that Lipschitz, activations being 1-Lipschitz). The block's own factor in the local
    product is the sum of its branches' masked products (``composed``)."""
    ends = [_run_branch(branch, f'{index}.{b}', state, options) for b, branch in enumerate(layer.branches)]
    global_norms = {rec.index: rec.global_sigma for rec in state.records}
    scale = sum(composed(branch, global_norms, f'{index}.{b}') for b, branch in enumerate(layer.branches))
    sparsity = state.sparsity + sum(end.sparsity - state.sparsity for end in ends)
    if options.rigorous:            # the scale an upper bound of the real sum of products
        return _rigorous_sum(ends, state, scale * (1 + slack_factor(operation_count([layer]))), sparsity)
    centre, lower, upper = (sum(getattr(end, name) for end in ends) for name in ('centre', 'lower', 'upper'))
    radius = state.radius * scale
    r = radius.view(-1, *([1] * (centre.dim() - 1)))
    lower, upper = torch.maximum(lower, centre - r), torch.minimum(upper, centre + r)
    return replace(state, centre=centre, radius=radius, lower=lower, upper=upper, mask=None, owner=None,
                   sparsity=sparsity)


def _run_branch(branch, prefix, state, options):
    """The state at the end of one branch of a residual block (records and counts shared)."""
    branch_state = replace(state, owner=None)
    for j, layer in enumerate(branch):
        branch_state = RULES[type(layer)](layer, f'{prefix}.{j}', branch_state, options)
    return branch_state


def _rigorous_sum(ends, state, scale, sparsity):
    """``sum_rule``'s join in float64 with outward rounding: box ends summed down / up, the centre's
    error bound summed up plus the rounding of the centre's sum, radius and ball rounded up."""
    centre, lower, upper, err = ends[0].centre, ends[0].lower, ends[0].upper, ends[0].centre_err
    for end in ends[1:]:
        centre = centre + end.centre
        lower, upper = down(lower + end.lower), up(upper + end.upper)
        err = up(up(err + end.centre_err) + up(centre.abs() * UNIT_ROUNDOFF))
    radius = up_product(state.radius, up(torch.as_tensor(scale, dtype=torch.float64, device=centre.device)))
    r = radius.view(-1, *([1] * (centre.dim() - 1)))
    reach = up(err + r)
    lower, upper = torch.maximum(lower, down(centre - reach)), torch.minimum(upper, up(centre + reach))
    return replace(state, centre=centre, radius=radius, lower=lower, upper=upper, mask=None, owner=None,
                   centre_err=err, sparsity=sparsity)


RULES = {                       # layer type -> bound rule (activations: see register_activation)
    **{cls: affine_rule for cls in OPERATORS},
    Residual: sum_rule,
    Flatten: flatten_rule,
    nn.Flatten: flatten_rule,
}


def register_layer(cls, rule=None):
    """Declare layer type ``cls`` to the pass: the one call a new layer type needs (README, "Your
    own network or data set"). A ``models.ConvLike`` subclass (a map that is one Conv2d whose weight
    and bias it computes from its parts) needs no rule: it is an affine layer, bounded with guaranteed
    norms of its computed weight like any conv. Any other type brings its ``rule(layer, index,
    state, options)``; activations use ``activations.register_activation``."""
    if rule is None:
        if not (isinstance(cls, type) and issubclass(cls, ConvLike)):
            raise TypeError(f'{getattr(cls, "__name__", cls)} is not a models.ConvLike: give its bound rule')
        OPERATORS[cls], rule = ConvOperator, affine_rule
    RULES[cls] = rule


def rule_for(layer, index=None):
    """The rule of ``layer``'s exact type (a subclass may compute something else: refused), after
    checking that the layer is one the rule models; BoundError naming the layer otherwise."""
    rule = RULES.get(type(layer))
    where = f'layer {index} ({type(layer).__name__})' if index is not None else type(layer).__name__
    if rule is None:
        raise BoundError(f'{where}: no bound rule for this layer type (the pass models '
                         f'{", ".join(sorted(cls.__name__ for cls in RULES))}; see local_bound.RULES)')
    problem = unmodelled_variant(layer)
    if problem:
        raise BoundError(f'{where}: {problem}, which the bound pass does not model')
    return rule


def unmodelled_variant(layer):
    """Why the rule of ``layer``'s type would not describe this instance ('' when it does)."""
    if isinstance(layer, (nn.Conv2d, ConvLike)):
        if layer.padding_mode != 'zeros':
            return f"padding_mode '{layer.padding_mode}' (only zero padding is)"
        if isinstance(layer.padding, str):
            return f"padding '{layer.padding}' (give the padding as numbers)"
        if tuple(layer.dilation) != (1, 1):
            return f'dilation {tuple(layer.dilation)}'
    if isinstance(layer, nn.Flatten) and (layer.start_dim != 1 or layer.end_dim != -1):
        return f'Flatten(start_dim={layer.start_dim}, end_dim={layer.end_dim}) (only start_dim=1, end_dim=-1 is)'
    return ''
