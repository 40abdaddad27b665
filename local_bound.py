"""Local-Lip bound propagation (docs/method.md §2-3).

A ball (centre, L2 radius) and a box (lower, upper) flow through the layers of an ``nn.Sequential``;
each layer type has one rule, looked up by type in ``RULES``. Affine layers are recorded with the
masks of varying neurons around them; after the pass, the masked spectral norm of every recorded
layer is estimated per sample (``spectral.py``: power iteration or Lanczos) and their product is
the local Lipschitz bound. The last Linear layer turns ball and box into worst-case logits
(``last_layer.py``: the BCP translation, iterative or exact).
"""
import contextlib
import copy
import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import data_load
import graph
import guaranteed
import spectral
from last_layer import dual_bound, exact_solution, label_column, translate
from settings import CERTIFIED, BoundError, BoundSettings
from spectral import global_spectral_norm, masked_norm, precise_global_norm, precise_masked_norms
from models import ClampGroupSort, ConvLike, Flatten, LinearResidual, ReLU_x, Residual, relu_x


# ----------------------------------------------------------------------------- affine operators

class ConvOperator:
    """A Conv2d as a linear operator on inputs of shape ``in_shape`` = (C, H, W)."""

    def __init__(self, layer, in_shape):
        self.layer, self.in_shape = layer, tuple(in_shape)
        h, w = in_shape[1:]
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        out_h, out_w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        self.out_shape = (layer.out_channels, out_h, out_w)
        # conv_transpose2d needs output_padding where the strided conv dropped rows/columns
        self.output_padding = (h - ((out_h - 1) * sh - 2 * ph + kh), w - ((out_w - 1) * sw - 2 * pw + kw))

    def _conv(self, x, weight, bias):
        layer = self.layer
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    def affine(self, x):
        return self._conv(x, self.layer.weight, self.layer.bias)

    def linear(self, x):
        return self._conv(x, self.layer.weight, None)

    def absolute(self, x):
        return self._conv(x, self.layer.weight.abs(), None)

    def adjoint(self, y):
        layer = self.layer
        return F.conv_transpose2d(y, layer.weight, None, layer.stride, layer.padding,
                                  self.output_padding, layer.groups, layer.dilation)

    def weight_grad(self, u, v):
        """d/dW of sum_b <v_b, W u_b>: the conv weight gradient for input u and output gradient v."""
        layer = self.layer
        return torch.ops.aten.convolution_backward(
            v, u, layer.weight, None, layer.stride, layer.padding, layer.dilation, False, [0, 0],
            layer.groups, [False, True, False])[1]

    @property
    def fan_in(self):
        """Products summed into one output: in_channels / groups * kernel area."""
        return self.layer.weight[0].numel()

    def bias_abs(self):
        """|bias| shaped to broadcast against outputs (0 without a bias); a folded layer's bound of it
        by the sizes of its terms (``bias_size``), which its rounding is relative to."""
        if hasattr(self.layer, 'bias_size'):
            return self.layer.bias_size()
        bias = self.layer.bias
        return 0.0 if bias is None else bias.abs().view(1, -1, 1, 1)

    def row_norms(self):
        """L2 norm of each output channel's whole filter, shaped [1, C_out, 1, 1]."""
        return self.layer.weight.flatten(1).norm(dim=1).view(1, -1, 1, 1)

    def masked_row_norms(self, in_mask):
        """Per sample, the L2 norm of each output neuron's row restricted to the varying inputs
        ``in_mask`` [B, C, H, W]: ``sqrt(conv(in_mask, W**2))``, at most the whole filter's norm."""
        layer = self.layer
        squares = F.conv2d(in_mask, layer.weight * layer.weight, None, layer.stride, layer.padding,
                           layer.dilation, layer.groups)
        return torch.minimum(_root(squares), self.row_norms())


class LinearOperator:
    """A Linear layer as a linear operator."""

    def __init__(self, layer, in_shape):
        self.layer, self.in_shape = layer, tuple(in_shape)
        self.out_shape = (layer.out_features,)

    def affine(self, x):
        return F.linear(x, self.layer.weight, self.layer.bias)

    def linear(self, x):
        return F.linear(x, self.layer.weight)

    def absolute(self, x):
        return F.linear(x, self.layer.weight.abs())

    def adjoint(self, y):
        return y @ self.layer.weight

    def weight_grad(self, u, v):
        return v.t() @ u

    @property
    def fan_in(self):
        return self.layer.in_features

    def bias_abs(self):
        if hasattr(self.layer, 'bias_size'):
            return self.layer.bias_size()
        bias = self.layer.bias
        return 0.0 if bias is None else bias.abs().view(1, -1)

    def row_norms(self):
        return self.layer.weight.norm(dim=1).view(1, -1)

    def masked_row_norms(self, in_mask):
        """Per sample, ``||W_j D_in||_2`` of every row j [B, out]: ``sqrt(in_mask (W**2)^T)``."""
        weight = self.layer.weight
        return torch.minimum(_root(in_mask @ (weight * weight).t()), self.row_norms())


def _root(squares):
    """Square root of sums of squares, with no infinite gradient where a sum is 0 (a row with no
    varying input then reads 1e-18 instead of 0: still an upper bound)."""
    return squares.clamp(min=1e-36).sqrt()


OPERATORS = {nn.Conv2d: ConvOperator, nn.Linear: LinearOperator, graph.FoldedLinear: LinearOperator,
             **{cls: ConvOperator for cls in (LinearResidual, graph.FoldedConv, graph.ChannelScale, graph.PoolConv)}}


def make_operator(layer, in_shape):
    return OPERATORS[type(layer)](layer, in_shape)


def is_affine(layer):
    return type(layer) in OPERATORS


# ----------------------------------------------------------------------------- the pass

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
    ``rigorous``: float64 arithmetic with every rounding covered (guaranteed settings; ``_rigorous_affine`` and docs/certificates.md, "Floating point")."""
    settings: BoundSettings
    global_norms: Optional[dict] = None
    rigorous: bool = False


# ----------------------------------------------------------------------------- rigorous rounding
#
# A guaranteed pass runs in float64 on an exact float64 copy of the model and covers every rounding,
# so that its boxes and balls contain the images of the real-valued network of the stored weights
# (docs/certificates.md, "Floating point"). One operation rounded to nearest is within half an ulp
# of its real result, so ``nextafter`` away from it gives a bound on the right side. A sum of n
# products computed in any order (blocked, with FMA) is within gamma_n = n u / (1 - n u) times the
# sum of the absolute products (Higham, Accuracy and Stability of Numerical Algorithms, §3.1);
# ``_slack_factor`` takes 4 (n + 4) u, which also covers the few operations around each sum.

UNIT_ROUNDOFF = 2.0 ** -53


def _down(t):
    """The next float64 below ``t`` (a lower bound of a real number ``t`` rounds to)."""
    return torch.nextafter(t, torch.full_like(t, -math.inf))


def _up(t):
    """The next float64 above ``t``."""
    return torch.nextafter(t, torch.full_like(t, math.inf))


def _up_product(a, b):
    """An upper bound of ``a * b`` (non-negative factors) that stays exactly 0 when a factor is 0."""
    product = a * b
    return torch.where((a == 0) | (b == 0), torch.zeros_like(product), _up(product))


def _slack_factor(terms):
    """Relative rounding slack of a float64 sum of ``terms`` products and a few operations around it."""
    return 4 * (terms + 4) * UNIT_ROUNDOFF


def _rigorous_affine(op, layer_rows, state, sigma):
    """(lower, upper, centre, centre_err, radius) after affine ``op`` in float64, every rounding
    covered: the box by interval arithmetic (mid/radius form), the ball-implied box by the centre's
    enclosure plus ``radius * layer_rows`` (row norms, inflated for their own rounding)."""
    slack = _slack_factor(op.fan_in)
    mid = (state.lower + state.upper) * 0.5
    half = _up(torch.maximum(state.upper - mid, mid - state.lower))      # [lower, upper] within mid +/- half
    box_mid, box_rad = op.affine(mid), op.absolute(half)
    widen = slack * (op.absolute(mid.abs() + half) + op.bias_abs())
    box_low, box_high = _down(_down(box_mid - box_rad) - widen), _up(_up(box_mid + box_rad) + widen)
    centre = op.affine(state.centre)
    # |W| err + gamma (|W| |c| + |b|) as one sum of non-negative terms, whose own rounding the
    # factor (1 + slack) covers
    centre_err = _up((op.absolute(state.centre_err + slack * state.centre.abs()) + slack * op.bias_abs())
                     * (1 + slack))
    r = state.radius.view(-1, *([1] * (centre.dim() - 1)))
    reach = _up(_up(r * (layer_rows * (1 + slack))) + centre_err)
    lower = torch.maximum(box_low, _down(centre - reach))
    upper = torch.minimum(box_high, _up(centre + reach))
    return lower, upper, centre, centre_err, _up_product(state.radius, sigma)


def _rigorous_ball_ends(state):
    """The box intersected with the ball's coordinate bounds, the centre's error included."""
    r = state.radius.view(-1, *([1] * (state.centre.dim() - 1)))
    reach = _up(state.centre_err + r)
    return (torch.maximum(state.lower, _down(state.centre - reach)),
            torch.minimum(state.upper, _up(state.centre + reach)))


# Registered activations compute in float64 with their own rounding, which the pass cannot see; it
# assumes an error of at most this relative amount (plus ACTIVATION_ATOL) and widens by it.
ACTIVATION_RTOL = 2.0 ** -40
ACTIVATION_ATOL = 2.0 ** -1000


def _widened(t, sign):
    """``t`` moved by an activation's assumed rounding error, down (sign -1) or up (sign +1)."""
    step = _up(t.abs() * ACTIVATION_RTOL + ACTIVATION_ATOL)
    return _down(t - step) if sign < 0 else _up(t + step)


# ----------------------------------------------------------------------------- fused interval steps
#
# The elementwise steps every layer pays for, as autograd Functions. The forward is the plain
# max/min/clamp arithmetic and also records, as 0/1 float tensors, which candidate won each
# max/min; the backward routes each incoming gradient with one multiplication by such a mask.
# Autograd's own max/min/clamp backward costs several full-size passes per operand (compare,
# where, masked_fill, divide), and torch.where / masked_fill are slow on CPU. Values are exactly
# those of torch.maximum/minimum/clamp; where two candidates tie, the gradient goes to one of them
# instead of half to each.

def _sum_to(t, shape):
    return t if t.shape == shape else t.sum_to_size(shape)


def _indicator(compare, a, b):
    """``compare(a, b)`` as a 0/1 tensor of a's dtype, written in one pass."""
    return compare(a, b, out=torch.empty_like(a))


_compiled = {}             # kernel -> its torch.compile'd version (a cache: values are the same)
_compiling = [False]       # set only inside ``compiled_kernels``


@contextlib.contextmanager
def compiled_kernels(enabled=True):
    """Within this block, run the elementwise kernels of the bound pass through ``torch.compile``
    (fused loops); the previous mode comes back on exit, exception or not.

    Same values; the first calls pay the compilation (about a minute per kernel on a small CPU).
    """
    previous, _compiling[0] = _compiling[0], bool(enabled)
    try:
        yield
    finally:
        _compiling[0] = previous


def _kernel(fn):
    """``fn`` eagerly, or compiled inside a ``compiled_kernels()`` block."""
    def run(*args):
        if not _compiling[0]:
            return fn(*args)
        compiled = _compiled.get(fn)
        if compiled is None:
            compiled = _compiled[fn] = torch.compile(fn, dynamic=True)
        return compiled(*args)
    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


@_kernel
def _intersection_forward(box_mid, box_rad, centre, ball_rad):
    box_low, ball_low = box_mid - box_rad, centre - ball_rad
    box_high, ball_high = box_mid + box_rad, centre + ball_rad
    box_sets_low = _indicator(torch.ge, box_low, ball_low)
    box_sets_high = _indicator(torch.le, box_high, ball_high)
    return torch.maximum(box_low, ball_low), torch.minimum(box_high, ball_high), box_sets_low, box_sets_high


@_kernel
def _intersection_backward(grad_lower, grad_upper, box_sets_low, box_sets_high):
    box_low, box_high = grad_lower * box_sets_low, grad_upper * box_sets_high
    grad_mid = box_low + box_high
    grad_rad = box_high - box_low
    grad_centre = grad_lower + grad_upper - grad_mid
    # d upper/d s on the ball's side minus d lower/d s (before summing to the ball's shape)
    grad_ball = grad_upper - grad_lower - grad_rad
    return grad_mid, grad_rad, grad_centre, grad_ball


class _BallBoxIntersection(torch.autograd.Function):
    """(lower, upper) = box [mid - rad, mid + rad] intersected with [centre - s, centre + s]."""

    @staticmethod
    def forward(ctx, box_mid, box_rad, centre, ball_rad):
        lower, upper, box_sets_low, box_sets_high = _intersection_forward(box_mid, box_rad, centre, ball_rad)
        ctx.save_for_backward(box_sets_low, box_sets_high)
        ctx.ball_shape = ball_rad.shape
        return lower, upper

    @staticmethod
    def backward(ctx, grad_lower, grad_upper):
        grad_mid, grad_rad, grad_centre, grad_ball = _intersection_backward(grad_lower, grad_upper,
                                                                            *ctx.saved_tensors)
        grad_ball = _sum_to(grad_ball, ctx.ball_shape) if ctx.needs_input_grad[3] else None
        return grad_mid, grad_rad, grad_centre, grad_ball


def _ball_ends(lower, upper, centre, radius):
    """Box ends intersected with the ball's ends, and which side set each end."""
    r = radius.view(-1, *([1] * (centre.dim() - 1)))
    ball_low, ball_high = centre - r, centre + r
    box_sets_low = _indicator(torch.ge, lower, ball_low)
    box_sets_high = _indicator(torch.le, upper, ball_high)
    return torch.maximum(lower, ball_low), torch.minimum(upper, ball_high), box_sets_low, box_sets_high


@_kernel
def _clip_forward(lower, upper, centre, radius, theta):
    """``clamp(min(t, theta), 0)`` of both ends and the centre, with the masks of its backward:
    passes where 0 <= t <= theta (there the output equals t), saturated where t > theta."""
    low, high, box_sets_low, box_sets_high = _ball_ends(lower, upper, centre, radius)
    outputs, masks = [], [box_sets_low, box_sets_high]
    for t in (low, high, centre):
        out = torch.minimum(t, theta).clamp(min=0)
        masks += [_indicator(torch.eq, out, t), _indicator(torch.gt, t, theta)]
        outputs.append(out)
    return (*outputs, *masks)


@_kernel
def _relu_forward(lower, upper, centre, radius):
    low, high, box_sets_low, box_sets_high = _ball_ends(lower, upper, centre, radius)
    outputs = [torch.relu(t) for t in (low, high, centre)]
    return (*outputs, box_sets_low, box_sets_high, *[_indicator(torch.gt, out, 0.0) for out in outputs])


@_kernel
def _ends_backward(g_low, g_high, g_centre, box_sets_low, box_sets_high):
    """Gradients of (lower, upper, centre, radius-per-element) from those of the clipped ends."""
    grad_lower, grad_upper = g_low * box_sets_low, g_high * box_sets_high
    via_low, via_high = g_low - grad_lower, g_high - grad_upper
    return grad_lower, grad_upper, g_centre + via_low + via_high, via_high - via_low


@_kernel
def _clip_backward(grad_low, grad_high, grad_centre, box_sets_low, box_sets_high, pass_low, sat_low,
                   pass_high, sat_high, pass_centre, sat_centre):
    grad_lower, grad_upper, grad_centre_in, grad_r = _ends_backward(
        grad_low * pass_low, grad_high * pass_high, grad_centre * pass_centre, box_sets_low, box_sets_high)
    to_theta = grad_low * sat_low + grad_high * sat_high + grad_centre * sat_centre
    return grad_lower, grad_upper, grad_centre_in, grad_r, to_theta


@_kernel
def _relu_backward(grad_low, grad_high, grad_centre, box_sets_low, box_sets_high, pass_low, pass_high,
                   pass_centre):
    return _ends_backward(grad_low * pass_low, grad_high * pass_high, grad_centre * pass_centre,
                          box_sets_low, box_sets_high)


class _ClippedBallStep(torch.autograd.Function):
    """Box of an elementwise clip activation ``act(t) = clamp(min(t, theta), 0)`` (theta None: ReLU).

    Returns ``act(max(lower, centre - r))``, ``act(min(upper, centre + r))`` and ``act(centre)``:
    for a non-decreasing elementwise activation the intersection commutes with it.
    """

    @staticmethod
    def forward(ctx, lower, upper, centre, radius, theta):
        if theta is None:
            results = _relu_forward(lower, upper, centre, radius)
        else:
            results = _clip_forward(lower, upper, centre, radius, theta)
        outputs, masks = results[:3], results[3:]
        ctx.save_for_backward(*masks, theta if theta is not None else radius.new_empty(0))
        ctx.has_theta = theta is not None
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_low, grad_high, grad_centre):
        *masks, theta = ctx.saved_tensors
        grad_theta = None
        if ctx.has_theta:
            grad_lower, grad_upper, grad_centre_in, grad_r, to_theta = _clip_backward(
                grad_low, grad_high, grad_centre, *masks)
            if ctx.needs_input_grad[4]:   # clamp(theta, 0) passes no gradient where theta < 0
                grad_theta = _sum_to(to_theta, theta.shape) * (theta >= 0).to(theta.dtype)
        else:
            grad_lower, grad_upper, grad_centre_in, grad_r = _relu_backward(grad_low, grad_high, grad_centre, *masks)
        grad_radius = grad_r.flatten(1).sum(1) if ctx.needs_input_grad[3] else None
        return grad_lower, grad_upper, grad_centre_in, grad_radius, grad_theta


class _Pick(torch.autograd.Function):
    """``max(a, b)`` (``min`` when ``smaller``) whose backward is one multiplication by a 0/1 mask."""

    @staticmethod
    def forward(ctx, a, b, smaller):
        out = torch.minimum(a, b) if smaller else torch.maximum(a, b)
        takes_a = (torch.le if smaller else torch.ge)(a, b, out=torch.empty_like(out))
        ctx.save_for_backward(takes_a)
        ctx.shapes = a.shape, b.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        takes_a, = ctx.saved_tensors
        grad_a = grad * takes_a
        grad_b = grad - grad_a if ctx.needs_input_grad[1] else None
        shape_a, shape_b = ctx.shapes
        return (_sum_to(grad_a, shape_a) if ctx.needs_input_grad[0] else None,
                None if grad_b is None else _sum_to(grad_b, shape_b), None)


def _larger(a, b):
    return _Pick.apply(a, b, False)


def _smaller(a, b):
    return _Pick.apply(a, b, True)


def affine_rule(layer, index, state, options):
    """Box of an affine layer: interval arithmetic intersected with the ball-implied box
    ``centre_j +/- r ||W_j||`` (the refined bound's 'rows': ``||W_j D_in||``, docs/method.md §7);
    the ball's radius grows by the layer's global norm."""
    op = make_operator(layer, state.centre.shape[1:])
    masked_rows = 'rows' in options.settings.refines and state.mask is not None
    if options.rigorous:
        rows = op.masked_row_norms(state.mask) if masked_rows else op.row_norms()
        sigma = state.centre.new_tensor(options.global_norms[index])
        lower, upper, centre, centre_err, radius = _rigorous_affine(op, rows, state, sigma)
        record = _record(state, index, op, sigma)
        return replace(state, centre=centre, radius=radius, lower=lower, upper=upper, mask=None, owner=record,
                       centre_err=centre_err)
    box_mid = op.affine((state.lower + state.upper) * 0.5)
    box_rad = op.absolute((state.upper - state.lower) * 0.5)
    centre = op.affine(state.centre)
    rows = op.masked_row_norms(state.mask) if masked_rows else op.row_norms()
    ball_rad = state.radius.view(-1, *([1] * (centre.dim() - 1))) * rows
    lower, upper = _BallBoxIntersection.apply(box_mid, box_rad, centre, ball_rad)
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


def _activation_step(index, state, act, mask, sparsity=0.0, theta=False, options=None, exact=True):
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
        low, high = _rigorous_ball_ends(state)
        lower, upper, centre = act(low), act(high), act(state.centre)
        if not exact:
            lower, upper = _widened(lower, -1), _widened(upper, 1)
            err = _up(err + _up(centre.abs() * ACTIVATION_RTOL + ACTIVATION_ATOL))
    elif theta is not False:
        lower, upper, centre = _ClippedBallStep.apply(state.lower, state.upper, state.centre, state.radius, theta)
    else:
        r = state.radius.view(-1, *([1] * (state.centre.dim() - 1)))
        lower = act(torch.maximum(state.lower, state.centre - r))
        upper = act(torch.minimum(state.upper, state.centre + r))
        centre = act(state.centre)
    if state.owner is not None:
        _add_out_mask(state.owner, mask)
    _count_varying(state, index, mask)
    return replace(state, centre=centre, lower=lower, upper=upper, mask=mask, sparsity=state.sparsity + sparsity,
                   centre_err=err)


def _add_out_mask(record, mask):
    """Mark as fixed the output neurons of ``record``'s layer that ``mask`` (same coordinates, any
    shape) marks fixed: a neuron held constant by any elementwise activation after the layer is
    constant through all of them."""
    mask = mask.reshape(mask.size(0), *record.op.out_shape)
    record.out_mask = mask if record.out_mask is None else record.out_mask * mask


def _count_varying(state, index, mask):
    """Record the per-sample fraction of varying neurons of activation ``index``."""
    state.varying[index] = mask.detach().flatten(1).mean(dim=1)


def relux_rule(layer, index, state, options):
    theta = layer.threshold
    fixed = (state.lower > theta) | (state.upper <= 0)          # a NaN bound is never fixed
    mask = (~fixed).to(state.centre.dtype)
    sparsity = 0.0
    sp_thres = options.settings.sp_thres
    if sp_thres is not None:
        sparsity = F.relu(state.upper).mean() + sp_thres * F.relu(theta - state.lower).mean()
    return _activation_step(index, state, lambda t: relu_x(t, theta), mask, sparsity, theta=theta, options=options)


def relu_rule(layer, index, state, options):
    mask = (~(state.upper <= 0)).to(state.centre.dtype)      # a NaN bound is never fixed
    sparsity = F.relu(state.upper).mean() if options.settings.sp_thres is not None else 0.0
    return _activation_step(index, state, F.relu, mask, sparsity, theta=None, options=options)


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
        return _activation_step(index, state, lambda t: act(layer, t), mask, options=options, exact=False)
    rule.act, rule.fixed = act, fixed
    return rule


# ----------------------------------------------------------------------------- checks of an activation
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
    c_high, c_low = _larger(c_a, c_b), _smaller(c_a, c_b)
    centre_err = state.centre_err
    if options.rigorous:        # max and min are 1-Lipschitz coordinate-wise: a pair's error is the larger one
        err = torch.maximum(*_halves(state.centre_err))
        centre_err, reach = torch.cat([err, err], dim=1), _up(err + r)
        below = lambda t: _down(t - reach)  # noqa: E731
        above = lambda t: _up(t + reach)  # noqa: E731
    else:
        below, above = (lambda t: t - r), (lambda t: t + r)
    lower_high = _larger(_larger(low_a, low_b), below(c_high))
    lower_low = _larger(_smaller(low_a, low_b), below(c_low))
    upper_high = _smaller(_larger(up_a, up_b), above(c_high))
    upper_low = _smaller(_smaller(up_a, up_b), above(c_low))
    top, bottom = layer.max, layer.min
    lower = torch.cat([_smaller(lower_high, top), _larger(lower_low, bottom)], dim=1)
    upper = torch.cat([_smaller(upper_high, top), _larger(upper_low, bottom)], dim=1)
    centre = torch.cat([_smaller(c_high, top), _larger(c_low, bottom)], dim=1)
    # a MaxMin mixes its pairs: the tensor no longer indexes the previous layer's outputs (owner None)
    new = replace(state, centre=centre, lower=lower, upper=upper, mask=None, owner=None, centre_err=centre_err)
    high_lower, low_upper = _halves(new.lower)[0], _halves(new.upper)[1]
    fixed = torch.cat([high_lower >= layer.max, low_upper <= layer.min], dim=1)
    new.mask = (~fixed).to(state.centre.dtype)
    _count_varying(new, index, new.mask)
    if options.settings.sp_thres is not None:
        new.sparsity = new.sparsity + F.relu(layer.max - high_lower).mean() + F.relu(low_upper - layer.min).mean()
    return new


def _halves(t):
    """The two channel halves of ``t`` (a MaxMin's pairs)."""
    return t.split(t.size(1) // 2, dim=1)


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
    scale = sum(composed(branch, {rec.index: rec.global_sigma for rec in state.records}, f'{index}.{b}')
                for b, branch in enumerate(layer.branches))
    if options.rigorous:            # an upper bound of the real sum of products
        scale = scale * (1 + _slack_factor(operation_count([layer])))
    sparsity = state.sparsity + sum(end.sparsity - state.sparsity for end in ends)
    if options.rigorous:
        return _rigorous_sum(ends, state, scale, sparsity)
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
        lower, upper = _down(lower + end.lower), _up(upper + end.upper)
        err = _up(_up(err + end.centre_err) + _up(centre.abs() * UNIT_ROUNDOFF))
    radius = _up_product(state.radius, _up(torch.as_tensor(scale, dtype=torch.float64, device=centre.device)))
    r = radius.view(-1, *([1] * (centre.dim() - 1)))
    reach = _up(err + r)
    lower, upper = torch.maximum(lower, _down(centre - reach)), torch.minimum(upper, _up(centre + reach))
    return replace(state, centre=centre, radius=radius, lower=lower, upper=upper, mask=None, owner=None,
                   centre_err=err, sparsity=sparsity)


def layer_key(prefix, j):
    """The key of layer ``j`` of a chain: ``j`` at the top (``prefix`` None), else ``'prefix.j'``."""
    return j if prefix is None else f'{prefix}.{j}'


def composed(layers, values, prefix=None):
    """The bound of the chain ``layers`` from per-layer ``values`` ({layer key: norm}): a chain
    multiplies, a residual block adds its branches' bounds (an empty branch, the identity, is 1);
    layers without a value (activations, the last layer) count 1."""
    total = 1.0
    for j, layer in enumerate(layers):
        key = layer_key(prefix, j)
        if type(layer) is Residual:
            total = total * sum(composed(branch, values, f'{key}.{b}') for b, branch in enumerate(layer.branches))
        elif key in values:
            total = total * values[key]
    return total


def key_order(key):
    """A sort key putting layer keys (``3``, ``'4.1.0'``) in pass order."""
    return tuple(int(part) for part in str(key).split('.'))


def has_sums(model):
    """True when the chain holds a residual block (its product is then ``composed``)."""
    return any(type(layer) is Residual for layer in model)


def operation_count(layers):
    """Multiplications and additions ``composed`` performs on ``layers`` (for its rounding)."""
    count = 0
    for layer in layers:
        if type(layer) is Residual:
            count += 1 + len(layer.branches) + sum(operation_count(branch) for branch in layer.branches)
        elif is_affine(layer):
            count += 1
    return count


RULES = {                       # layer type -> bound rule (activations: see register_activation)
    **{cls: affine_rule for cls in OPERATORS},
    Residual: sum_rule,
    Flatten: flatten_rule,
    nn.Flatten: flatten_rule,
}


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


def activation_layers(model, prefix=None):
    """Keys of the registered activation layers of ``model`` (inside residual blocks too)."""
    keys = []
    for j, layer in enumerate(model):
        key = layer_key(prefix, j)
        if type(layer) is Residual:
            keys += [k for b, branch in enumerate(layer.branches) for k in activation_layers(branch, f'{key}.{b}')]
        elif type(layer) in ACTIVATIONS:
            keys.append(key)
    return keys


@torch.no_grad()
def project_parameters(model):
    """Apply every activation's projection (after each optimiser step)."""
    for layer in model.modules():
        spec = ACTIVATIONS.get(type(layer))
        if spec is not None and spec.project is not None:
            spec.project(layer)


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


# Largest eps the pass accepts: inputs live in [0, 1] (a few times that when normalised), and larger
# radii would overflow the float32 bound arithmetic (squares of radii past 1.8e19 are inf).
MAX_EPS = 1e4


def per_sample_eps(eps, x, dtype=None):
    """``eps`` (a number, or one per sample) as a tensor [B] on x's device in ``dtype`` (default
    x's; guaranteed passes take float64, which holds a Python float exactly); BoundError unless the
    batch is not empty and every value is finite, >= 0 and at most ``MAX_EPS``."""
    if x.dim() < 2 or x.size(0) == 0:
        raise BoundError(f'expected a non-empty batch [B, ...] of inputs, not shape {tuple(x.shape)}')
    values = torch.as_tensor(eps, dtype=dtype or x.dtype, device=x.device)
    if values.dim() == 0:
        values = values.expand(x.size(0))
    if values.shape != (x.size(0),):
        raise BoundError(f'eps must be a number or one value per sample ({x.size(0)}), not shape '
                         f'{tuple(values.shape)}')
    if not (torch.isfinite(values).all() and (values >= 0).all()):
        bad = values[~(torch.isfinite(values) & (values >= 0))][0]
        raise BoundError(f'eps must be a finite number >= 0, not {float(bad)}')
    if (values > MAX_EPS).any():
        raise BoundError(f'eps must be at most {MAX_EPS:g} (an L2 radius on inputs in [0, 1]), not '
                         f'{float(values.max()):g}')
    return values


def check_labels(y, batch, classes):
    """Refuse (BoundError, one line) labels that are not one integer class in [0, ``classes``) per sample."""
    if (not torch.is_tensor(y) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool
            or y.shape != (batch,)):
        raise BoundError(f'y must be integer labels of shape ({batch},), one per image of x, not '
                         + (f'{y.dtype} of shape {tuple(y.shape)}' if torch.is_tensor(y) else type(y).__name__))
    if batch and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise BoundError(f'labels must lie in 0..{classes - 1} (the model has {classes} logits), not '
                         f'{int(y.min())}..{int(y.max())}')


def check_input_shapes(model, input_shape, batch_shape=None):
    """Refuse (BoundError, one line naming the layer) an input shape (one sample's) that a layer of
    the chain cannot take: a Linear needs a flat input of in_features, a Conv2d (C, H, W) with C its
    in_channels and room for its kernel, a clipped MaxMin an even channel count; a parameter of an
    activation must broadcast over its input. ``batch_shape`` (the whole batch's shape, when there
    is one) adds hints for an unbatched input or one without its channel dimension."""
    shape = tuple(input_shape)
    what = f'x of shape {tuple(batch_shape)}' if batch_shape is not None else f'an input of shape {shape}'
    misfits = []              # reported after the walk: a layer that cannot take the input says more
    _walk_shapes(model, shape, what, tuple(batch_shape) if batch_shape is not None else None, None, misfits)
    if misfits:
        raise BoundError(misfits[0])


def _walk_shapes(layers, shape, what, batch_shape, prefix, misfits):
    """``check_input_shapes`` along ``layers`` (into residual blocks); returns the output shape."""
    for j, layer in enumerate(layers):
        key = layer_key(prefix, j)
        where = f'{what} does not fit the model: layer {key} ({type(layer).__name__})'
        if type(layer) is Residual:
            ends = {_walk_shapes(branch, shape, what, batch_shape, f'{key}.{b}', misfits)
                    for b, branch in enumerate(layer.branches)}
            if len(ends) > 1:
                raise BoundError(f'{where}: its branches end in different shapes {sorted(ends)}; they must add')
            shape = ends.pop()
            continue
        misfits += filter(None, [_parameter_misfit(layer, shape, where)])
        shape = _output_shape(layer, shape, where, batch_shape)
    return shape


def _output_shape(layer, shape, where, batch_shape):
    """The shape ``layer`` makes of one sample of ``shape``; BoundError when it cannot take it."""
    def refuse(wanted, hint=''):
        raise BoundError(f'{where} takes [B, {", ".join(map(str, wanted))}], here {list(shape)}{hint}')
    batched_3d = batch_shape is not None and len(batch_shape) == 3
    if isinstance(layer, (nn.Linear, graph.FoldedLinear)):
        if shape != (layer.in_features,):
            rank = len(batch_shape) if batch_shape is not None else 0
            refuse((layer.in_features,), ' (one unbatched example? pass x.unsqueeze(0))' if rank == 1 else
                   ' (the model was built for images of another size)' if rank > 2 else '')
        return (layer.out_features,)
    if isinstance(layer, (nn.Conv2d, ConvLike)):
        if len(shape) != 3 or shape[0] != layer.in_channels:
            unbatched = batched_3d and batch_shape[0] == layer.in_channels
            no_channel = batched_3d and layer.in_channels == 1
            refuse((layer.in_channels, 'H', 'W'), ' (one unbatched image? pass x.unsqueeze(0))' if unbatched else
                   ' (no channel dimension? pass x.unsqueeze(1))' if no_channel else '')
        sizes = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                      zip(shape[1:], layer.padding, layer.dilation, layer.kernel_size, layer.stride))
        if min(sizes) < 1:
            refuse((layer.in_channels, 'H', 'W'), f' (images too small for its {tuple(layer.kernel_size)} kernel)')
        return (layer.out_channels, *sizes)
    if isinstance(layer, (Flatten, nn.Flatten)):
        return (math.prod(shape),)
    if isinstance(layer, ClampGroupSort) and (not shape or shape[0] % 2):
        raise BoundError(f'{where} pairs the channel halves: it needs an even channel count, not shape {shape}')
    return shape


def _parameter_misfit(layer, shape, where):
    """Why a parameter of the elementwise ``layer`` does not broadcast over its input of ``shape``
    (None when every one does; affine layers' parameters are checked by ``_output_shape``)."""
    if is_affine(layer):
        return None
    half = (shape[0] // 2, *shape[1:]) if isinstance(layer, ClampGroupSort) and shape else shape
    for name, parameter in layer.named_parameters():
        try:
            fits = torch.broadcast_shapes((1, *half), parameter.shape) == (1, *half)
        except RuntimeError:
            fits = False
        if not fits:
            return (f'{where}: parameter {name} of shape {tuple(parameter.shape)} does not broadcast '
                    f'over its input {shape}')
    return None


def propagate(model, x, eps, settings=CERTIFIED, global_norms=None, *, starts=None, store_layers=None,
              steps=None):
    """Carry ball and box from the input to the penultimate layer. Returns the final BoundState.

    ``eps``: one L2 radius for the batch, or a tensor [B] with one per sample. The global norms
    that size the ball's box are ``global_norms`` ({affine layer index: norm}) when given, else
    guaranteed upper bounds with guaranteed settings, else the warm power iteration.
    With the refined bound's 'radius' refinement the per-sample norms are taken during the pass
    (``PassNorms``): ``starts`` are their start vectors ({layer: [B, *in_shape]}: a store's, or
    with guaranteed settings fresh ones, by default seeded by ``settings.seed`` and the row),
    ``store_layers`` a store's layers and ``steps`` the Lanczos steps of every guaranteed norm
    (default ``settings.sniter``)."""
    model = boundable(model, x)
    check_boundable(model)
    check_input_shapes(model, x.shape[1:], x.shape)
    settings = _checked(settings)
    if has_sums(model) and settings.refines:
        raise BoundError('the refined bound follows plain chains; a model with residual blocks takes the local '
                         'or the global bound')
    if global_norms is None and settings.guaranteed:
        global_norms = _global_norm_bounds(model, x.shape[1:], settings)
    options = PassOptions(settings, global_norms, rigorous=settings.guaranteed)
    radius = per_sample_eps(eps, x, torch.float64 if options.rigorous else None).clone()
    if options.rigorous:
        model, x, radius = float64_copy(model), x.double(), radius.double()
        shaped = radius.view(-1, *([1] * (x.dim() - 1)))
        state = BoundState(x, radius, _down(x - shaped), _up(x + shaped), centre_err=torch.zeros_like(x))
    else:
        shaped = radius.view(-1, *([1] * (x.dim() - 1)))
        state = BoundState(x, radius, x - shaped, x + shaped)
    state.layout = model if has_sums(model) else None
    with _exact_float64_kernels(x.device, options.rigorous):
        return _run_layers(model, state, options, starts, store_layers, steps, x)


def _run_layers(model, state, options, starts, store_layers, steps, x):
    """``propagate``'s loop over every layer but the last."""
    settings = options.settings
    follow = 'radius' in settings.refines
    if follow:
        if settings.guaranteed and starts is None:
            starts = fresh_starts(affine_input_shapes(model, x.shape[1:]), x.size(0), None, settings.seed, x.device)
        state.pass_norms = PassNorms(settings, x.size(0), starts, store_layers, steps)
    for i, layer in enumerate(list(model)[:-1]):
        if follow and is_affine(layer):
            state = state.pass_norms.settle(state)
        state = RULES[type(layer)](layer, i, state, options)      # check_boundable vetted every layer
        if follow and type(layer) in ACTIVATIONS:
            state = state.pass_norms.settle(state)
    return state.pass_norms.settle(state) if follow else state


def float64_copy(model):
    """An exact float64 copy of ``model`` (every float32/16 value is a float64), on its device."""
    return copy.deepcopy(model).double()


@contextlib.contextmanager
def _exact_float64_kernels(device, rigorous):
    """Within a rigorous pass on CUDA, convolutions by plain sums of products (cuDNN may choose
    FFT or Winograd algorithms, whose error is not the summation bound the slack assumes)."""
    if rigorous and torch.device(device).type == 'cuda':
        with torch.backends.cudnn.flags(enabled=False):
            yield
    else:
        yield


def _guaranteed_refined(settings):
    """True when the per-sample norms are guaranteed and taken during the pass (refined 'radius')."""
    return settings.guaranteed and 'radius' in settings.refines


def _masked(settings):
    """``settings`` with a local bound where they ask for the global one (masked norms wanted)."""
    return settings.replace(bound='local') if settings.bound == 'global' else settings


def _checked(settings):
    """``settings`` with a seed (``BoundSettings.seeded``: a secret one drawn now when it has none)."""
    if not isinstance(settings, BoundSettings):
        raise TypeError(f'expected a settings.BoundSettings, not {type(settings).__name__}')
    return settings.seeded()


# ----------------------------------------------------------------------------- per-example store

def _probe(model, shape):
    """A zero input of ``shape`` on the device and in the dtype of ``model``'s parameters."""
    param = next(model.parameters())
    return torch.zeros(1, *shape, device=param.device, dtype=param.dtype)


def affine_input_shapes(model, input_shape):
    """{layer key: input shape} for every conv/linear layer but the last (``affine_layers``)."""
    return {key: shape for key, (_, shape) in affine_layers(model, input_shape).items()}


def affine_layers(model, input_shape):
    """{layer key: (layer, input shape)} for every conv/linear layer but the last, those inside
    residual blocks included (keys ``'i.b.j'``, see ``layer_key``), in pass order."""
    table = {}
    with torch.no_grad():
        _walk_affine(list(model)[:-1], _probe(model, input_shape), None, table)
    return table


def _walk_affine(layers, x, prefix, table):
    """Fill ``table`` along ``layers`` from the input ``x``; returns the output."""
    for j, layer in enumerate(layers):
        key = layer_key(prefix, j)
        if type(layer) is Residual:
            x = sum(_walk_affine(list(branch), x, f'{key}.{b}', table) for b, branch in enumerate(layer.branches))
            continue
        if is_affine(layer):
            table[key] = (layer, tuple(x.shape[1:]))
        x = layer(x)
    return x


def layer_seed(seed, key):
    """The seed of the global-norm start of layer ``key``: ``seed + 7919 (key + 1)`` at the top (the
    layout of every recorded run), a hash of both inside residual blocks."""
    if isinstance(key, int):
        return seed + 7919 * (key + 1)
    return int.from_bytes(hashlib.blake2b(f'{seed}:{key}'.encode(), digest_size=7).digest(), 'little')


class SingularVectorStore:
    """Per-example start vectors of the masked power iteration (warm starts across epochs).

    One tensor per stored layer, shape ``[n, *layer_input_shape]``, random normal at creation (an
    example's rows depend only on ``seed`` and its index, see ``example_normals``), on ``device``
    in ``dtype``. ``owned`` (a LongTensor of dataset indices) makes the store hold only
    those examples (a distributed rank's share); ``gather``/``scatter`` always take dataset indices.
    """

    def __init__(self, model, input_shape, num_examples, *, layers=None, device='cpu',
                 dtype=torch.float32, pin_memory=False, owned=None, seed=None):
        shapes = affine_input_shapes(model, input_shape)
        if layers is not None:
            unknown = sorted(set(layers) - set(shapes), key=key_order)
            if unknown:
                raise ValueError(f'--indices {unknown} are not conv/linear layers before the last; '
                                 f'choose from {list(shapes)}')
            shapes = {i: shapes[i] for i in sorted(layers, key=key_order)}
        self.shapes, self.device, self.dtype = shapes, torch.device(device), dtype
        self.num_examples = num_examples
        self.position = None
        count = num_examples
        if owned is not None:
            owned = torch.as_tensor(owned, dtype=torch.long)
            self.position = torch.full((num_examples,), -1, dtype=torch.long)
            self.position[owned] = torch.arange(len(owned))
            self.position = self.position.to(self.device)
            count = len(owned)
        self.num_owned = count
        rows = owned if owned is not None else torch.arange(num_examples)
        self.vectors = _store_tensors(shapes, rows, seed, dtype, self.device, pin_memory)

    def __contains__(self, layer_index):
        return layer_index in self.vectors

    @property
    def nbytes(self):
        return sum(v.numel() * v.element_size() for v in self.vectors.values())

    def _rows(self, index):
        index = index.to(self.device)
        if self.position is None:
            return index
        rows = self.position[index]
        if (rows < 0).any():
            raise IndexError('store asked for examples it does not own')
        return rows

    def gather(self, index, device, dtype=torch.float32):
        """{layer: start vectors of examples ``index``} on ``device`` in ``dtype``."""
        rows = self._rows(index)
        return {i: v[rows].to(device=device, dtype=dtype, non_blocking=True) for i, v in self.vectors.items()}

    def scatter(self, index, vectors):
        """Write back (detached) the final vectors of examples ``index``; a vector that is zero,
        NaN, inf or too small to stay a direction in the store's dtype is re-drawn instead."""
        rows = self._rows(index)
        for i, u in vectors.items():
            self.vectors[i][rows] = spectral.usable_vectors(u.detach().to(device=self.device, dtype=self.dtype))

    def state_dict(self):
        return {'vectors': self.vectors, 'position': self.position}

    def load_state_dict(self, state):
        for i, v in state['vectors'].items():
            if v.shape != self.vectors[i].shape:
                raise ValueError(f'store layer {i}: saved shape {tuple(v.shape)} != {tuple(self.vectors[i].shape)}')
            self.vectors[i].copy_(v)


def example_normals(shapes, index, seed):
    """{layer: N(0,1) rows [len(index), *shape]} where example i's rows depend on (seed, i) alone.

    An example therefore starts from the same vectors whichever rank, shard or batch holds it.
    """
    sizes = [math.prod(shape) for shape in shapes.values()]
    flat = torch.empty(len(index), sum(sizes))
    generator = torch.Generator()
    for row, i in zip(flat, torch.as_tensor(index).tolist()):
        generator.manual_seed(example_seed(seed, i))
        row.normal_(generator=generator)
    return {layer: part.reshape(-1, *shape)
            for (layer, shape), part in zip(shapes.items(), flat.split(sizes, dim=1))}


def example_seed(seed, i):
    """The generator seed of example ``i`` under ``seed``: ``seed * 2**32 + i`` for a seed below
    2**32 (the layout every recorded run used), else a 64-bit hash of both, so that every bit of a
    secret 63-bit seed counts."""
    if seed < 2**32:
        return (seed % 2**32) * 2**32 + i
    digest = hashlib.blake2b(f'{seed}:{i}'.encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little')


def _store_tensors(shapes, rows, seed, dtype, device, pin_memory):
    """Store tensors for the examples ``rows`` (``seed`` None: drawn from the global RNG).

    Filled by ``example_normals`` in chunks of about 2**26 numbers, so a half-precision store
    needs no full-size fp32 temporary.
    """
    seed = int(torch.randint(2**31, ())) if seed is None else seed
    pin = pin_memory and device.type == 'cpu'
    out = {i: torch.empty((len(rows), *shape), dtype=dtype, device=device, pin_memory=pin)
           for i, shape in shapes.items()}
    chunk = max(1, 2**26 // max(1, sum(math.prod(shape) for shape in shapes.values())))
    for start in range(0, len(rows), chunk):
        for i, block in example_normals(shapes, rows[start:start + chunk], seed).items():
            out[i][start:start + len(block)] = block.to(device=device, dtype=dtype)
    return out


# ----------------------------------------------------------------------------- Lipschitz product

def lipschitz_product(state, settings, *, starts=None, store_layers=None):
    """Per-sample product of the estimated norms of the recorded layers, the final start vectors,
    and the norms themselves ({layer index: sigma [B]}, detached). The estimate methods only.

    ``settings.bound == 'global'`` uses every layer's global norm; a norm the refined pass already
    took (``AffineRecord.sigma``) is used as it is. ``starts`` ({layer: [B, *in_shape]}) are a
    store's start vectors; the layers not ``in store_layers`` (a store, None: no store)
    contribute their global norm (TinyImageNet's partial stores); without a store every layer
    starts from fresh random vectors. The per-sample norms are those of ``settings.method`` (see
    ``spectral.masked_norm``).
    """
    batch = state.centre.size(0)
    product = torch.ones(batch, device=state.centre.device, dtype=state.centre.dtype)
    starts = starts or {}
    finals = dict(state.pass_norms.finals) if state.pass_norms is not None else {}
    norms, sigmas = {}, {}
    for rec in state.records:
        if rec.sigma is not None:
            sigma = rec.sigma
        elif settings.bound == 'global' or (store_layers is not None and rec.index not in store_layers):
            sigma = rec.global_sigma.expand(batch)
        else:
            u = starts.get(rec.index)
            if u is None:
                u = torch.randn(batch, *rec.op.in_shape, device=product.device, dtype=product.dtype)
            sigma, finals[rec.index] = masked_norm(rec.op, u, rec.in_mask, rec.out_mask, settings.sniter,
                                                   method=settings.method, tol=settings.tol,
                                                   grad=settings.power_grad)
        norms[rec.index], sigmas[rec.index] = sigma.detach(), sigma
        product = product * sigma
    if state.layout is not None:
        product = composed(state.layout, sigmas) * torch.ones_like(product)
    return product, finals, norms


# ----------------------------------------------------------------------------- guaranteed norms

def failure_events(settings, layers):
    """How many norm checks one guaranteed certificate can rest on: every layer's global norm and
    its per-sample norm at every check (the union bound splits ``failure_prob`` over them)."""
    checks = 0 if settings.bound == 'global' else len(guaranteed.check_steps(settings.sniter))
    return max(1, layers * (checks + 1))


def guaranteed_global_norms(model, input_shape, settings):
    """{affine layer index: upper bound of its plain spectral norm} for every conv/linear layer but
    the last (``guaranteed.global_norm_bound``, exact where the matrix is small)."""
    model = graph.as_chain(model, tuple(input_shape), RULES)
    check_boundable(model)
    return _global_norm_bounds(model, input_shape, _checked(settings))


def _global_norm_bounds(model, input_shape, settings):
    """``guaranteed_global_norms`` of a model ``check_boundable`` accepted (the first step of every
    guaranteed pass: a NaN or inf parameter is refused here, where no upper bound exists; estimates
    of such a model certify nothing)."""
    check_finite_parameters(model)
    table = affine_layers(model, input_shape)
    delta = settings.failure_prob / failure_events(settings, len(table))
    return {key: guaranteed.global_norm_bound(make_operator(_exact_values(layer), shape), settings.global_steps,
                                              delta, layer_seed(settings.seed, key), memo_on=layer)
            for key, (layer, shape) in table.items()}


def _exact_values(layer):
    """``layer``, or for a folded one (``graph.FOLDED_TYPES``) a plain float64 layer of its values
    folded in float64: the fold's float64 rounding is what the norm margins cover (a fold rounded
    to float32 would differ from the real network by more)."""
    return float64_copy(layer).plain() if type(layer) in graph.FOLDED_TYPES else layer


def fresh_starts(shapes, batch, index, seed, device):
    """{layer index: standard normal start vectors [B, *in_shape]} for ``shapes`` ({layer index:
    input shape}) drawn afresh: from (seed, example index) when ``index`` is given (the same whatever
    the batch), else from ``seed`` and the row."""
    if index is not None:
        drawn = example_normals(shapes, torch.as_tensor(index).cpu(), seed)
    else:
        generator = torch.Generator().manual_seed(seed)
        drawn = {i: torch.randn(batch, *shape, generator=generator) for i, shape in shapes.items()}
    return {i: u.to(device) for i, u in drawn.items()}


class _GuaranteedNorms:
    """The per-sample norms of the recorded layers (``add``) for the samples still undecided: exact
    ones (small layers) and Krylov runs advanced together to each check; ``cap`` (a layer's
    guaranteed global norm) also bounds its estimate and upper bound. A Krylov bound below the
    start-free lower bound ``guaranteed.masked_norm_floor`` missed the top direction: inf."""

    def __init__(self, starts, settings, batch):
        self.starts, self.settings = starts, settings
        self.exact, self.runs, self.caps, self.order, self.floors = {}, {}, {}, [], {}
        self.rows = torch.arange(batch)

    def add(self, rec, cap=None):
        batch = len(self.rows)
        if guaranteed.explicit_size(rec.op) <= self.settings.exact_below:
            self.exact[rec.index] = guaranteed.explicit_norm_bounds(rec.op, rec.in_mask, rec.out_mask, batch)
        else:
            self.runs[rec.index] = guaranteed.KrylovRun(rec.op, rec.in_mask, rec.out_mask, self.starts[rec.index],
                                                        dtype=torch.float32)
            self.floors[rec.index] = guaranteed.masked_norm_floor(rec.op, rec.in_mask, rec.out_mask, batch)
        if cap is not None:
            self.caps[rec.index] = cap
        self.order.append(rec.index)
        return self

    def check(self, steps, delta):
        """Advance every run to ``steps``; returns ({layer: (estimate, upper)} for the remaining rows)."""
        return {i: self.check_one(i, steps, delta) for i in self.order}

    def check_one(self, i, steps, delta):
        """Layer ``i``'s run advanced to ``steps``: (estimate, upper bound) of the remaining rows."""
        if i in self.exact:
            value = self.exact[i][self.rows.to(self.exact[i].device)]
            estimate, upper = value, value
        else:
            run = self.runs[i]
            run.advance(steps - run.steps)
            floor = self.floors[i][self.rows.to(self.floors[i].device)]
            estimate, upper = guaranteed.checked_bounds(*run.bounds(delta), floor)
        cap = self.caps.get(i)
        if cap is not None:
            estimate, upper = estimate.clamp(max=cap), upper.clamp(max=cap)
        return estimate, upper

    def keep(self, keep):
        """Drop the decided rows (``keep``: bool over the remaining rows)."""
        self.rows = self.rows[keep.cpu()]
        for run in self.runs.values():
            run.keep(keep)


# ----------------------------------------------------------------------------- the refined bound

class PassNorms:
    """The refined bound's per-sample norms, taken during the pass as soon as a layer's masks are
    known (docs/method.md §7): the ball after layer i has radius ``radius_in * sigma_i``.

    ``sigma_i`` is the estimate of ``settings.method`` (the store's start vectors, else fresh ones;
    gradients pass as in ``lipschitz_product``) or, with guaranteed settings, the upper bound after
    ``steps`` Lanczos steps from the given fresh ``starts`` (``estimates`` keeps the matching
    estimates); each is capped by the layer's global norm, an upper bound of every masked one.
    Layers a partial store lacks use their global norm, as in ``lipschitz_product``."""

    def __init__(self, settings, batch, starts=None, store_layers=None, steps=None):
        self.settings, self.starts, self.store_layers = settings, starts or {}, store_layers
        self.finals, self.estimates = {}, {}
        self.guaranteed = None
        if settings.guaranteed:
            self.steps = settings.sniter if steps is None else steps
            self.guaranteed = _GuaranteedNorms(starts, settings, batch)

    def settle(self, state):
        """Take the norm of the last recorded layer if not yet taken; the ball's radius follows it."""
        if not state.records or state.records[-1].sigma is not None:
            return state
        rec = state.records[-1]
        rec.sigma = self._norm(rec, state.centre.size(0))
        rigorous = state.centre_err is not None
        radius = _up_product(rec.radius_in, rec.sigma) if rigorous else rec.radius_in * rec.sigma
        return replace(state, radius=radius)

    def _norm(self, rec, batch):
        if self.store_layers is not None and rec.index not in self.store_layers:
            return rec.global_sigma.expand(batch)
        if self.guaranteed is not None:
            delta = self.settings.failure_prob / failure_events(self.settings, len(self.starts))
            estimate, upper = self.guaranteed.add(rec, cap=float(rec.global_sigma)).check_one(rec.index, self.steps,
                                                                                            delta)
            self.estimates[rec.index] = estimate
            return upper.to(rec.global_sigma.dtype)
        u = self.starts.get(rec.index)
        if u is None:
            u = torch.randn(batch, *rec.op.in_shape, device=rec.global_sigma.device, dtype=rec.global_sigma.dtype)
        settings = self.settings
        sigma, self.finals[rec.index] = masked_norm(rec.op, u, rec.in_mask, rec.out_mask, settings.sniter,
                                                    method=settings.method, tol=settings.tol,
                                                    grad=settings.power_grad)
        return torch.minimum(sigma, rec.global_sigma)


def guaranteed_refined_product(model, x, y, eps, settings, index=None):
    """Guaranteed refined products and label columns, decided round by round.

    Round k runs the whole refined pass with every per-sample norm the upper bound after
    ``check_steps(settings.sniter)[k]`` Lanczos steps (fresh starts seeded by ``settings.seed`` and
    the example ``index``, the same in every round), for the samples still undecided. A sample stops
    once the upper bounds certify it, or once the estimates of its round do not, else at the last
    round; ``y`` None: once its product's bound is within ``settings.tol`` (default 1e-2) of its
    estimate. Every bound is one check of one norm, so the failure budget is that of
    ``guaranteed_local_product``. Decisions are ``rigorous_decision``'s. Returns (product [B],
    label column or None, norms, the BoundState of every sample's deciding round, assembled,
    certified [B] bool or None)."""
    batch, device = x.size(0), x.device
    last = float64_copy(list(model)[-1])
    shapes = affine_input_shapes(model, x.shape[1:])
    starts = fresh_starts(shapes, batch, index, settings.seed, device)
    global_norms = _global_norm_bounds(model, x.shape[1:], settings)
    checks = guaranteed.check_steps(settings.sniter)
    product = torch.zeros(batch, dtype=x.dtype, device=device)
    norms = {i: torch.zeros(batch, dtype=torch.float64, device=device) for i in shapes}
    column, decided, certified = None, None, None
    if y is not None:
        column = torch.zeros(batch, last.out_features, dtype=torch.float64, device=device)
        certified = torch.zeros(batch, dtype=torch.bool, device=device)
    remaining = torch.arange(batch, device=device)
    for k, steps in enumerate(checks):
        sub_starts = {i: u[remaining] for i, u in starts.items()}
        state = propagate(model, x[remaining], eps[remaining], settings, global_norms, starts=sub_starts, steps=steps)
        ones = torch.ones(len(remaining), dtype=torch.float64, device=device)
        high = math.prod((rec.sigma.double() for rec in state.records), start=ones)
        low = math.prod(state.pass_norms.estimates.values(), start=ones)
        last_round = k + 1 == len(checks)
        if y is None:
            done = torch.full_like(high, last_round, dtype=torch.bool) | _settled(high, low, state, settings)
        else:           # the pass's final radius is the rounded-up product of the upper bounds
            holds, column_high, done = _decided(last, y[remaining], state, state.radius,
                                                _rigorous_radius(eps[remaining], low, len(state.records)), last_round)
            column[remaining[done]] = column_high[done]
            certified[remaining[done]] = holds[done]
        product[remaining[done]] = high[done].to(x.dtype)
        for rec in state.records:
            norms[rec.index][remaining[done]] = rec.sigma.double()[done]
        decided = _merged(decided, state, remaining[done], done, batch)
        remaining = remaining[~done]
        if not remaining.numel():
            break
    return product, column, norms, decided, certified


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


def _combined(state, bounds, batch, device):
    """(low, high) products [batch] of ``bounds`` ({layer key: (estimate, upper bound)}): in record
    order along a plain chain, by ``composed`` along one with residual blocks."""
    ones = torch.ones(batch, dtype=torch.float64, device=device)
    if state.layout is not None:
        return tuple(composed(state.layout, {k: b[side] for k, b in bounds.items()}) * ones for side in (0, 1))
    return (math.prod((b[0] for b in bounds.values()), start=ones),
            math.prod((b[1] for b in bounds.values()), start=ones.clone()))


def factor_count(state):
    """The roundings in the product of a pass's norms (``_rigorous_radius`` covers them)."""
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
    """Guaranteed per-sample products and label columns, decided check by check.

    At each check (``guaranteed.check_steps``) every layer's norm has an estimate and an upper
    bound; a sample stops once the upper bounds certify it (certified) or the estimates do not
    (the converged norms, which lie between the two, would not either), else at the last check.
    ``y`` None: no decisions; a sample stops once its product's bound is within ``settings.tol``
    (default 1e-2) of its estimate. ``state`` is a rigorous pass's and ``last`` the float64 copy
    of the last layer (``rigorous_decision``). Returns (product [B], label column [B, C] float64 or
    None, norms, certified [B] bool or None).
    """
    batch, device = state.centre.size(0), state.centre.device
    product = torch.zeros(batch, dtype=torch.float64, device=device)
    norms = {rec.index: torch.zeros(batch, dtype=torch.float64, device=device) for rec in state.records}
    column = None if y is None else torch.zeros(batch, last.out_features, dtype=torch.float64, device=device)
    certified = None if y is None else torch.zeros(batch, dtype=torch.bool, device=device)
    checks = guaranteed.check_steps(settings.sniter)
    delta = settings.failure_prob / failure_events(settings, len(state.records))
    shapes = {rec.index: rec.op.in_shape for rec in state.records}
    runs = _GuaranteedNorms(fresh_starts(shapes, batch, index, settings.seed, device), settings, batch)
    for rec in state.records:
        runs.add(rec, cap=_float_above(rec.global_sigma))     # a masked norm is at most the plain one
    remaining = torch.arange(batch, device=device)
    for k, steps in enumerate(checks):
        if not remaining.numel():
            break
        bounds = runs.check(steps, delta)
        low, high = _combined(state, bounds, len(remaining), device)
        last_check = k + 1 == len(checks)
        if y is None:
            done = torch.full_like(low, last_check, dtype=torch.bool) | _settled(high, low, state, settings)
        else:
            factors = factor_count(state)
            holds, column_high, done = _decided(last, y[remaining], _rows_of(state, remaining),
                                                _rigorous_radius(eps[remaining], high, factors),
                                                _rigorous_radius(eps[remaining], low, factors), last_check)
            column[remaining[done]] = column_high[done]
            certified[remaining[done]] = holds[done]
        product[remaining[done]] = high[done]
        for i, (_, upper) in bounds.items():
            norms[i][remaining[done]] = upper[done]
        runs.keep(~done)
        remaining = remaining[~done]
    return product, column, norms, certified


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
        slack = _slack_factor(weight.size(1))
        self.fixed = self.dot + spread * (1 + slack) + slack * size
        self.low = torch.clamp(_down(_down(state.lower - c) - err), max=0).unsqueeze(1)
        self.high = torch.clamp(_up(_up(state.upper - c) + err), min=0).unsqueeze(1)

    def decide(self, radius):
        """(certified [B], label column [B, C]) at ``radius`` [B] (see ``rigorous_decision``)."""
        radius = radius.double()
        _, lam = exact_solution(self.w, self.low, self.high, radius)
        gap = _up(self.fixed + dual_bound(self.w, self.low, self.high, radius, lam))
        own = torch.arange(self.classes, device=self.y.device) == self.y.unsqueeze(1)
        gap = torch.where(own, torch.zeros_like(gap), gap)
        others = torch.where(own, torch.full_like(gap, -math.inf), gap)
        certified = torch.isfinite(gap).all(dim=1) & (others.max(dim=1).values < 0)
        return certified, gap - self.dot


def _rigorous_radius(eps, product, factors):
    """An upper bound of ``eps * product`` (float64; ``product`` of ``factors`` rounded norms)."""
    return _up_product(eps.double(), product.double() * (1 + _slack_factor(factors)))


def certifies_with(logits, y, column):
    """Bool [B]: the clean prediction is right and the worst-case logits from ``column`` certify
    (finite, label first by the margin)."""
    worst = translate(logits, y, column)
    return (correct_predictions(logits, y) & torch.isfinite(column).all(dim=1)
            & strictly_first(worst, y, MARGIN_RTOL))


# ----------------------------------------------------------------------------- public API

@dataclass
class BoundOutput:
    logits: torch.Tensor        # clean logits (the ball centre through the last layer)
    worst: torch.Tensor         # worst-case logits [B, C] (or [B, C+1] with gloro)
    lipschitz: torch.Tensor     # per-sample product of the layer norms [B] (upper bounds when guaranteed)
    sparsity: torch.Tensor      # TinyImageNet sparsity term (0 unless sp_thres is given)
    norms: dict = field(default_factory=dict)     # {affine layer index: its norm in the product [B]}
    varying: dict = field(default_factory=dict)   # {activation index: fraction of varying neurons [B]}
    global_lipschitz: Optional[torch.Tensor] = None  # product of the plain (global) norms of the pass
    global_norms: dict = field(default_factory=dict)  # {affine layer index: the global norm that sized its box}
    finite: Optional[torch.Tensor] = None         # bool [B]: box, translation and product all finite
    failure_prob: Optional[float] = None          # guaranteed: a certificate fails with at most this
    certified: Optional[torch.Tensor] = None      # guaranteed: bool [B], decided by ``rigorous_decision``


def check_boundable(model):
    """Refuse (BoundError, one line) a model whose last module is not a Linear layer (the
    translation needs affine logits) or that holds a layer the rules do not model."""
    if not isinstance(model, nn.Sequential):
        raise BoundError(f'{type(model).__name__} is not a chain of layers: pass it through local_bound.boundable '
                         '(the public functions do)')
    layers = list(model)
    if not layers or type(layers[-1]) is not nn.Linear:
        last = type(layers[-1]).__name__ if layers else 'nothing'
        raise BoundError(f'the last module of the model must be nn.Linear (the logits), not {last}: '
                         'an activation after the logits would void the worst-case translation')
    _check_rules(layers[:-1], None)
    check_bare_forwards(model)


def _check_rules(layers, prefix):
    """``rule_for`` every layer of the chain, inside residual blocks too."""
    for j, layer in enumerate(layers):
        key = layer_key(prefix, j)
        rule_for(layer, key)
        if type(layer) is Residual:
            for b, branch in enumerate(layer.branches):
                _check_rules(list(branch), f'{key}.{b}')


def _named_layers(model):
    """('the model', model) and ('layer name (Type)', module) for every module inside it, nested
    ones included (a folded layer's parts, a user module's submodules)."""
    return [('the model', model)] + [(f'layer {name} ({type(module).__name__})', module)
                                     for name, module in model.named_modules() if name]


def boundable(model, x):
    """``model`` as the chain the pass walks: itself when it is a Sequential of layers with rules,
    else ``graph.as_chain``'s rewrite of it for inputs shaped like ``x`` (a batch). Hooks or
    replaced forwards anywhere in the user's module are refused first (the rewrite keeps layers)."""
    if not isinstance(model, nn.Module):
        raise BoundError(f'expected an nn.Module, not {type(model).__name__}')
    check_bare_forwards(model)
    if not (torch.is_tensor(x) and x.dim() >= 2):
        return model                 # check_batch says what is wrong with x
    return graph.as_chain(model, tuple(x.shape[1:]), RULES)


def check_bare_forwards(model):
    """Refuse (BoundError, one line) what would make a layer compute other than its bare forward,
    which is what the rules model: a forward hook or forward pre-hook on the model or a layer, one
    registered globally for every module, or a forward replaced on an instance."""
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        raise BoundError('a global forward hook is registered (torch.nn.modules.module.register_module_forward_'
                         '[pre_]hook): the bound pass models the bare layers; remove it to certify')
    for where, module in _named_layers(model):
        if module._forward_hooks or module._forward_pre_hooks:
            raise BoundError(f'{where} has a forward hook or pre-hook: the bound pass models the bare layer; '
                             'remove it to certify')
        if 'forward' in vars(module):
            raise BoundError(f'{where} has its forward replaced on the instance: the bound pass models the '
                             "layer type's own forward")


def check_finite_parameters(model):
    """Refuse (BoundError, one line naming the layer) a model with a NaN or infinite parameter."""
    parameters = list(model.parameters())
    if not parameters or torch.stack([torch.isfinite(p).all() for p in parameters]).all():
        return
    for where, layer in _named_layers(model)[1:]:
        for name, parameter in layer.named_parameters():
            if not torch.isfinite(parameter).all():
                raise BoundError(f'{where}: parameter {name} holds NaN or inf values; no bound holds for it')



def check_batch(model, x, y=None):
    """Refuse (BoundError, one line) a batch the model cannot take, before any pass: ``x`` must be a
    floating tensor [B, *input shape] in the dtype and on the device of the model's parameters whose
    shape fits every conv/linear layer (an unbatched image, or another data set's images, stop
    here); ``y``, when given, integer labels [B] below the number of logits."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        kind = f'dtype {x.dtype}' if torch.is_tensor(x) else type(x).__name__
        raise BoundError(f'x must be a floating-point tensor of images in [0, 1], not {kind}')
    param = next(model.parameters())
    if (x.dtype, x.device) != (param.dtype, param.device):
        raise BoundError(f'x is {x.dtype} on {x.device} but the model is {param.dtype} on {param.device}: '
                         f'pass x.to({param.dtype}).to("{param.device}")')
    check_boundable(model)
    check_input_shapes(model, x.shape[1:], x.shape)
    if y is not None:
        check_labels(y, x.size(0), list(model)[-1].out_features)


# Certification decides with a margin, never on a tie: float32 rounding of logits of size |z| is
# about 1e-7 |z| per operation, so a margin inside MARGIN_RTOL * (1 + |z_y|) is no evidence.
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


def certified_predictions(out, y):
    """Bool [B] from a BoundOutput: correct clean prediction, finite box, translation, Lipschitz
    product and worst-case logits, and the label's worst-case logit first by more than the margin
    (``MARGIN_RTOL``)."""
    finite = out.finite if out.finite is not None else torch.ones_like(y, dtype=torch.bool)
    if out.certified is not None:            # a guaranteed pass decided with every rounding covered
        return out.certified & torch.isfinite(out.lipschitz) & finite
    return (correct_predictions(out.logits, y) & torch.isfinite(out.lipschitz) & finite
            & strictly_first(out.worst, y, MARGIN_RTOL))


def _box_finite(state):
    finite = [torch.isfinite(t).flatten(1).all(dim=1) for t in (state.centre, state.lower, state.upper)]
    return finite[0] & finite[1] & finite[2] & torch.isfinite(state.radius)


def bound_outputs(model, x, y, eps, settings=CERTIFIED, *, store=None, index=None):
    """One bound pass with ``settings`` (a ``settings.BoundSettings``; default: guaranteed norms):
    clean logits, worst-case logits, Lipschitz product and sparsity term, plus the per-layer norms,
    the fractions of varying neurons and whether everything was finite (see ``BoundOutput``).

    ``store``/``index``: per-example start vectors of the estimate methods (read, then written
    back). Guaranteed norms never read a store: they start from fresh vectors seeded by
    ``settings.seed`` (None: a secret seed drawn for this call) and the example ``index`` (or the
    row when index is None).
    NaN entries of the translation are set to 0 in the worst-case logits (the authors' rule, for the
    training loss); ``finite`` records them, and ``certified_predictions`` never certifies them.
    """
    model = boundable(model, x)
    check_batch(model, x, y)
    settings = _checked(settings)
    eps = per_sample_eps(eps, x, torch.float64 if settings.guaranteed else None)
    last = list(model)[-1]
    certified = None
    if settings.guaranteed:
        product, column, norms, state, certified = _guaranteed_outputs(model, x, y, eps, settings, index)
        logits = float64_copy(last)(state.centre).to(x.dtype)
        column, product = column.to(x.dtype), product.to(x.dtype)
    else:
        starts = store.gather(index, x.device, x.dtype) if store is not None else None
        state = propagate(model, x, eps, settings, starts=starts, store_layers=store)
        logits = last(state.centre)
        product, finals, norms = lipschitz_product(state, settings, starts=starts, store_layers=store)
        if store is not None and finals:
            store.scatter(index, finals)
        column = worst_case_column(last, y, state, eps * product, settings)
    finite = _box_finite(state) & torch.isfinite(column).all(dim=1) & torch.isfinite(product)
    column = torch.where(torch.isnan(column), torch.zeros_like(column), column)
    sparsity = state.sparsity if torch.is_tensor(state.sparsity) else logits.new_zeros(())
    global_product = global_bound(state) if state.records else logits.new_ones(())
    return BoundOutput(logits, translate(logits, y, column, settings.gloro), product, sparsity, norms,
                       state.varying, global_product,
                       {rec.index: float(rec.global_sigma.detach()) for rec in state.records}, finite,
                       settings.failure_prob if settings.guaranteed else None, certified)


def _guaranteed_outputs(model, x, y, eps, settings, index):
    """(product, label column, norms, penultimate state, certified) of a guaranteed pass: local
    and refined bounds decided check by check, the global one from its guaranteed global norms;
    every decision by ``rigorous_decision`` (never a store: fresh starts, see ``bound_outputs``)."""
    if _guaranteed_refined(settings):
        product, column, norms, state, certified = guaranteed_refined_product(model, x, y, eps, settings, index)
        return product, column, norms, state, certified
    state = propagate(model, x, eps, settings)
    last = float64_copy(list(model)[-1])
    if settings.bound != 'global':
        product, column, norms, certified = guaranteed_local_product(state, last, y, eps, settings, index)
        return product, column, norms, state, certified
    product, _, norms = lipschitz_product(state, settings)
    certified, column = rigorous_decision(last, y, state, _rigorous_radius(eps, product, factor_count(state)))
    return product, column, norms, state, certified


def worst_case_logits(model, x, y, eps, settings, *, store=None, index=None):
    """Differentiable worst-case logits [B, C] (or [B, C+1] with ``settings.gloro``) in the eps-ball."""
    return bound_outputs(model, x, y, eps, settings, store=store, index=index).worst


@torch.no_grad()
def certify(model, x, y, eps, settings=CERTIFIED, *, store=None, index=None):
    """Bool [B]: True where the example is certified (see ``certified_predictions``).

    The default settings are guaranteed (``settings.CERTIFIED``); ``settings.AUTHORS`` is the
    authors' procedure and ``settings.LANCZOS`` today's fast estimate (no guarantee)."""
    out = bound_outputs(model, x, y, eps, settings, store=store, index=index)
    return certified_predictions(out, y)


@torch.no_grad()
def local_lipschitz(model, x, eps, settings=CERTIFIED, *, index=None):
    """[B]: product of the masked spectral norms of every conv/linear layer but the last (upper
    bounds with guaranteed settings, each within ``settings.tol``, default 1e-2, of its estimate):
    the paper's local bound, or the refined one with ``settings.bound == 'refined'`` (a global
    ``settings.bound`` reads as local)."""
    model = boundable(model, x)
    check_batch(model, x)
    settings = _masked(_checked(settings))
    eps = per_sample_eps(eps, x, torch.float64 if settings.guaranteed else None)
    if _guaranteed_refined(settings):
        return _rounded_up(guaranteed_refined_product(model, x, None, eps, settings, index)[0], x.dtype)
    state = propagate(model, x, eps, settings)
    if settings.guaranteed:
        return _rounded_up(guaranteed_local_product(state, None, None, eps, settings, index)[0], x.dtype)
    return lipschitz_product(state, settings)[0]


def _rounded_up(t, dtype):
    """``t`` in ``dtype``, rounded up where the conversion rounded down (an upper bound stays one)."""
    low = t.to(dtype)
    return torch.where(low.double() < t.double(), torch.nextafter(low, torch.full_like(low, math.inf)), low)


@torch.no_grad()
def layer_norms(model, x, eps, settings=CERTIFIED, *, precise=False, rtol=1e-6):
    """{affine layer index: per-sample masked norm [B]} of every conv/linear layer but the last,
    on the masks of one bound pass at ``eps``.

    ``precise=False``: the norms a certification with ``settings`` multiplies (fresh starts).
    ``precise=True``: ``spectral.precise_masked_norms`` of the same masks (float64; explicit SVD
    for small layers, else Lanczos with full re-orthogonalisation to relative residual ``rtol``),
    for a convergence audit.
    """
    model = boundable(model, x)
    settings = _masked(_checked(settings))
    state = propagate(model, x, eps, settings)
    if precise:
        return {rec.index: precise_masked_norms(rec.op, rec.in_mask, rec.out_mask, rtol=rtol,
                                                  batch=x.size(0)).to(x.dtype)
                for rec in state.records}
    if _guaranteed_refined(settings):
        return {rec.index: rec.sigma.detach() for rec in state.records}
    if settings.guaranteed:
        return guaranteed_local_product(state, None, None, per_sample_eps(eps, x, torch.float64), settings)[2]
    return lipschitz_product(state, settings)[2]


def infer_input_shape(model):
    """The input shape (C, H, W) or (F,) that ``model`` accepts, among those of the registered data sets."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f'cannot infer the input shape of a {type(model).__name__}; pass input_shape=(C, H, W)')
    first = list(model)[0]
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    for shape in sorted({spec.shape for spec in data_load.DATASETS.values() if spec.shape[0] == first.in_channels}):
        try:
            with torch.no_grad():
                model(_probe(model, shape))
            return shape
        except RuntimeError:
            continue
    raise ValueError('cannot infer the input shape; pass input_shape=(C, H, W)')


@torch.no_grad()
def global_lipschitz(model, *, sniter=2000, input_shape=None, precise=False):
    """Product of the plain spectral norms of every conv/linear layer but the last.

    ``precise=False``: ``sniter`` rounds of the warm-started global power iteration (the vectors
    training uses move on). ``precise=True``: ``precise_global_norms`` (float64, converged to
    1e-6), leaving the training vectors untouched.
    """
    shape = tuple(input_shape) if input_shape is not None else infer_input_shape(model)
    model = graph.as_chain(model, shape, RULES)
    if precise:
        return composed(model, precise_global_norms(model, shape))
    return composed(model, {key: float(global_spectral_norm(make_operator(layer, in_shape), sniter))
                            for key, (layer, in_shape) in affine_layers(model, shape).items()})


@torch.no_grad()
def precise_global_norms(model, input_shape):
    """{affine layer index: float64 norm converged to 1e-6} of every conv/linear layer but the last
    (``spectral.precise_global_norm``; the warm vectors are read, never moved)."""
    model = graph.as_chain(model, tuple(input_shape), RULES)
    return {key: float(precise_global_norm(make_operator(layer, shape))[0])
            for key, (layer, shape) in affine_layers(model, input_shape).items()}


def global_product(model, input_shape, settings):
    """The product of the global norms a report shows: guaranteed upper bounds with guaranteed
    ``settings``, else ``settings.sniter`` rounds of the warm power iteration."""
    if settings.guaranteed:
        model = graph.as_chain(model, tuple(input_shape), RULES)
        return composed(model, guaranteed_global_norms(model, input_shape, settings))
    return global_lipschitz(model, sniter=settings.sniter, input_shape=input_shape)


class BoundedModel(nn.Module):
    """Wraps a Sequential so that one forward (and so DistributedDataParallel) covers the bound pass.

    ``forward(x)`` is the plain model; ``forward(x, y, eps, settings, store=, index=)`` returns the
    fields of ``bound_outputs`` as a tuple (logits, worst, lipschitz, sparsity).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y=None, eps=None, settings=CERTIFIED, store=None, index=None):
        if eps is None:
            return self.model(x)
        out = bound_outputs(self.model, x, y, eps, settings, store=store, index=index)
        return out.logits, out.worst, out.lipschitz, out.sparsity
