"""Local-Lip bound propagation (SPEC sections 2-3).

A ball (centre, L2 radius) and a box (lower, upper) flow through the layers of an ``nn.Sequential``;
each layer type has one rule, looked up by type in ``RULES``. Affine layers are recorded with the
masks of varying neurons around them; after the pass, the masked spectral norm of every recorded
layer is estimated per sample (``spectral.py``: power iteration or Lanczos) and their product is
the local Lipschitz bound. The last Linear layer turns ball and box into worst-case logits
(``last_layer.py``: the BCP translation, iterative or exact).
"""
import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from last_layer import (LAYOUTS, TRANSLATIONS, clip_and_rescale, exact_solver, label_column,  # noqa: F401
                        label_translation, pairwise_translation, translate)
from spectral import (EPS, GLOBAL_TOL, LOCAL_TOL, METHODS, POWER_GRADS, batch_norms,  # noqa: F401
                      global_spectral_norm, global_vectors_state, lanczos_masked_norm, load_global_vectors,
                      masked_norm, masked_spectral_norm, precise_global_norm, precise_masked_norms)
from utils import ClampGroupSort, Flatten, ReLU_x, relu_x


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

    def row_norms(self):
        """L2 norm of each output channel's whole filter, shaped [1, C_out, 1, 1]."""
        return self.layer.weight.flatten(1).norm(dim=1).view(1, -1, 1, 1)


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

    def row_norms(self):
        return self.layer.weight.norm(dim=1).view(1, -1)


OPERATORS = {nn.Conv2d: ConvOperator, nn.Linear: LinearOperator}


def make_operator(layer, in_shape):
    return OPERATORS[type(layer)](layer, in_shape)


def is_affine(layer):
    return type(layer) in OPERATORS


# ----------------------------------------------------------------------------- the pass

@dataclass
class AffineRecord:
    """An affine layer met by the pass, with the masks around it and its global norm."""
    index: int
    op: object
    global_sigma: torch.Tensor
    in_mask: Optional[torch.Tensor] = None
    out_mask: Optional[torch.Tensor] = None


@dataclass
class BoundState:
    """What flows between layers: ball centre and radius, box, and the current varying mask;
    ``records`` (affine layers met) and ``varying`` ({activation index: fraction of varying
    neurons [B]}) accumulate along the pass."""
    centre: torch.Tensor
    radius: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    mask: Optional[torch.Tensor] = None
    records: list = field(default_factory=list)
    sparsity: torch.Tensor = 0.0
    varying: dict = field(default_factory=dict)


@dataclass
class PassOptions:
    sniter: int
    sp_thres: Optional[float] = None   # sparsity term wanted (TinyImageNet); None = skip
    power_grad: str = 'unrolled'       # see masked_spectral_norm
    method: str = 'power'              # per-sample norms: 'power' or 'lanczos' (spectral.masked_norm)
    tol: Optional[float] = None        # their per-sample stopping tolerance (None: the method's default)


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


_compiled = {}             # kernel -> its torch.compile'd version
_use_compiled = False


def use_compiled_kernels(flag=True):
    """Run the elementwise kernels of the bound pass through ``torch.compile`` (fused loops).

    Same values; the first calls pay the compilation (about a minute per kernel on a small CPU).
    """
    global _use_compiled
    _use_compiled = bool(flag)


def _kernel(fn):
    """``fn`` eagerly, or compiled once ``use_compiled_kernels(True)`` was called."""
    def run(*args):
        if not _use_compiled:
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
    op = make_operator(layer, state.centre.shape[1:])
    box_mid = op.affine((state.lower + state.upper) * 0.5)
    box_rad = op.absolute((state.upper - state.lower) * 0.5)
    centre = op.affine(state.centre)
    ball_rad = state.radius.view(-1, *([1] * (centre.dim() - 1))) * op.row_norms()
    lower, upper = _BallBoxIntersection.apply(box_mid, box_rad, centre, ball_rad)
    sigma = global_spectral_norm(op, options.sniter, grad=options.power_grad)
    state.records.append(AffineRecord(index, op, sigma, in_mask=state.mask))
    return replace(state, centre=centre, radius=state.radius * sigma, lower=lower, upper=upper, mask=None)


def _activation_step(index, state, act, mask, out_mask, sparsity, elementwise=True, theta=False):
    """Shared part of every activation rule: box through ``act`` intersected with the ball's box.

    For an elementwise non-decreasing ``act``, ``max(act(l), act(m - r)) = act(max(l, m - r))``
    (and likewise for the upper bound), so the intersection is taken before the activation.
    ``theta`` (a threshold tensor, or None for ReLU) selects the fused clip step instead of ``act``.
    """
    if theta is not False:
        lower, upper, centre = _ClippedBallStep.apply(state.lower, state.upper, state.centre, state.radius, theta)
    elif elementwise:
        r = state.radius.view(-1, *([1] * (state.centre.dim() - 1)))
        lower = act(torch.maximum(state.lower, state.centre - r))
        upper = act(torch.minimum(state.upper, state.centre + r))
        centre = act(state.centre)
    else:
        r = state.radius.view(-1, *([1] * (state.centre.dim() - 1)))
        lower = torch.maximum(act(state.lower), act(state.centre - r))
        upper = torch.minimum(act(state.upper), act(state.centre + r))
        centre = act(state.centre)
    if out_mask:
        state.records[-1].out_mask = mask
    _count_varying(state, index, mask)
    return replace(state, centre=centre, lower=lower, upper=upper, mask=mask, sparsity=state.sparsity + sparsity)


def _count_varying(state, index, mask):
    """Record the per-sample fraction of varying neurons of activation ``index``."""
    state.varying[index] = mask.detach().flatten(1).mean(dim=1)


def relux_rule(layer, index, state, options):
    theta = layer.threshold
    mask = ((state.lower <= theta) & (state.upper > 0)).to(state.centre.dtype)
    sparsity = 0.0
    if options.sp_thres is not None:
        sparsity = F.relu(state.upper).mean() + options.sp_thres * F.relu(theta - state.lower).mean()
    return _activation_step(index, state, lambda t: relu_x(t, theta), mask, True, sparsity, theta=theta)


def relu_rule(layer, index, state, options):
    mask = (state.upper > 0).to(state.centre.dtype)
    sparsity = F.relu(state.upper).mean() if options.sp_thres is not None else 0.0
    return _activation_step(index, state, F.relu, mask, True, sparsity, theta=None)


def maxmin_rule(layer, index, state, options):
    """Box ``max(act(l), act(m - r)) .. min(act(u), act(m + r))`` of the clipped MaxMin ``act``.

    Computed without applying ``act`` five times: the clips commute with the intersection
    (``max(min(A, t), min(B, t)) = min(max(A, B), t)``) and ``act(m -/+ r)`` before clipping is
    ``(max(a, b) -/+ r, min(a, b) -/+ r)`` for the channel halves a, b of m. Same values.
    """
    def halves(t):
        return t.split(t.size(1) // 2, dim=1)

    r = state.radius.view(-1, *([1] * (state.centre.dim() - 1)))
    (low_a, low_b), (up_a, up_b), (c_a, c_b) = halves(state.lower), halves(state.upper), halves(state.centre)
    c_high, c_low = _larger(c_a, c_b), _smaller(c_a, c_b)
    lower_high = _larger(_larger(low_a, low_b), c_high - r)
    lower_low = _larger(_smaller(low_a, low_b), c_low - r)
    upper_high = _smaller(_larger(up_a, up_b), c_high + r)
    upper_low = _smaller(_smaller(up_a, up_b), c_low + r)
    top, bottom = layer.max, layer.min
    lower = torch.cat([_smaller(lower_high, top), _larger(lower_low, bottom)], dim=1)
    upper = torch.cat([_smaller(upper_high, top), _larger(upper_low, bottom)], dim=1)
    centre = torch.cat([_smaller(c_high, top), _larger(c_low, bottom)], dim=1)
    new = replace(state, centre=centre, lower=lower, upper=upper, mask=None)
    high_lower, _ = new.lower.split(new.lower.size(1) // 2, dim=1)
    _, low_upper = new.upper.split(new.upper.size(1) // 2, dim=1)
    fixed = torch.cat([high_lower >= layer.max, low_upper <= layer.min], dim=1)
    new.mask = (~fixed).to(state.centre.dtype)
    _count_varying(new, index, new.mask)
    if options.sp_thres is not None:
        new.sparsity = new.sparsity + F.relu(layer.max - high_lower).mean() + F.relu(low_upper - layer.min).mean()
    return new


def flatten_rule(layer, index, state, options):
    flat = lambda t: None if t is None else t.reshape(t.size(0), -1)  # noqa: E731
    return replace(state, centre=flat(state.centre), lower=flat(state.lower), upper=flat(state.upper),
                   mask=flat(state.mask))


RULES = {
    nn.Conv2d: affine_rule,
    nn.Linear: affine_rule,
    ReLU_x: relux_rule,
    nn.ReLU: relu_rule,
    ClampGroupSort: maxmin_rule,
    Flatten: flatten_rule,
    nn.Flatten: flatten_rule,
}


def rule_for(layer):
    for cls in type(layer).__mro__:
        if cls in RULES:
            return RULES[cls]
    raise TypeError(f'no bound rule for layer type {type(layer).__name__}; add one to local_bound.RULES')


def per_sample_eps(eps, x):
    """``eps`` (a number, or one per sample) as a tensor [B] on x's device; BoundError unless every
    value is finite and >= 0."""
    values = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if values.dim() == 0:
        values = values.expand(x.size(0))
    if values.shape != (x.size(0),):
        raise BoundError(f'eps must be a number or one value per sample ({x.size(0)}), not shape '
                         f'{tuple(values.shape)}')
    if not (torch.isfinite(values).all() and (values >= 0).all()):
        bad = values[~(torch.isfinite(values) & (values >= 0))][0]
        raise BoundError(f'eps must be a finite number >= 0, not {float(bad)}')
    return values


def propagate(model, x, eps, options):
    """Carry ball and box from the input to the penultimate layer. Returns the final BoundState.

    ``eps``: one L2 radius for the batch, or a tensor [B] with one per sample."""
    check_boundable(model)
    radius = per_sample_eps(eps, x).clone()
    shaped = radius.view(-1, *([1] * (x.dim() - 1)))
    state = BoundState(x, radius, x - shaped, x + shaped)
    for index, layer in enumerate(list(model)[:-1]):
        state = rule_for(layer)(layer, index, state, options)
    return state


# ----------------------------------------------------------------------------- per-example store

def _probe(model, shape):
    """A zero input of ``shape`` on the device and in the dtype of ``model``'s parameters."""
    param = next(model.parameters())
    return torch.zeros(1, *shape, device=param.device, dtype=param.dtype)


def affine_input_shapes(model, input_shape):
    """{layer index: input shape} for every conv/linear layer but the last."""
    shapes, x = {}, _probe(model, input_shape)
    layers = list(model)
    with torch.no_grad():
        for index, layer in enumerate(layers[:-1]):
            if is_affine(layer):
                shapes[index] = tuple(x.shape[1:])
            x = layer(x)
    return shapes


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
            unknown = sorted(set(layers) - set(shapes))
            if unknown:
                raise ValueError(f'--indices {unknown} are not conv/linear layers before the last; '
                                 f'choose from {sorted(shapes)}')
            shapes = {i: shapes[i] for i in sorted(layers)}
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
        """Write back (detached) the final vectors of examples ``index``."""
        rows = self._rows(index)
        for i, u in vectors.items():
            self.vectors[i][rows] = u.detach().to(device=self.device, dtype=self.dtype)

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
        generator.manual_seed((seed % 2**32) * 2**32 + i)
        row.normal_(generator=generator)
    return {layer: part.reshape(-1, *shape)
            for (layer, shape), part in zip(shapes.items(), flat.split(sizes, dim=1))}


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

def lipschitz_product(state, options, *, bound='local', store=None, index=None):
    """Per-sample product of the norms of the recorded layers, the final start vectors, and the
    norms themselves ({layer index: sigma [B]}, detached).

    ``bound='global'`` uses every layer's global norm. With a store, its layers use their stored
    start vectors and the other layers contribute their global norm (TinyImageNet's partial
    stores); without one, every layer starts from fresh random vectors. The per-sample norms are
    those of ``options.method`` (power iteration or Lanczos, see ``spectral.masked_norm``).
    """
    batch = state.centre.size(0)
    product = torch.ones(batch, device=state.centre.device, dtype=state.centre.dtype)
    starts = store.gather(index, state.centre.device, state.centre.dtype) if store is not None else {}
    finals, norms = {}, {}
    for rec in state.records:
        if bound == 'global' or (store is not None and rec.index not in store):
            sigma = rec.global_sigma.expand(batch)
        else:
            u = starts.get(rec.index)
            if u is None:
                u = torch.randn(batch, *rec.op.in_shape, device=product.device, dtype=product.dtype)
            sigma, finals[rec.index] = masked_norm(rec.op, u, rec.in_mask, rec.out_mask, options.sniter,
                                                   method=options.method, tol=options.tol,
                                                   grad=options.power_grad)
        norms[rec.index] = sigma.detach()
        product = product * sigma
    return product, finals, norms


# ----------------------------------------------------------------------------- public API

@dataclass
class BoundOutput:
    logits: torch.Tensor        # clean logits (the ball centre through the last layer)
    worst: torch.Tensor         # worst-case logits [B, C] (or [B, C+1] with gloro)
    lipschitz: torch.Tensor     # per-sample product of the layer norms [B]
    sparsity: torch.Tensor      # TinyImageNet sparsity term (0 unless sp_thres is given)
    norms: dict = field(default_factory=dict)     # {affine layer index: its norm in the product [B]}
    varying: dict = field(default_factory=dict)   # {activation index: fraction of varying neurons [B]}
    global_lipschitz: Optional[torch.Tensor] = None  # product of the plain (global) norms of the pass


class BoundError(ValueError):
    """A model or input the bound pass cannot handle (one-line message)."""


def check_boundable(model):
    """Refuse a model whose last module is not a Linear layer: the translation needs affine logits."""
    layers = list(model)
    if not layers or not isinstance(layers[-1], nn.Linear):
        last = type(layers[-1]).__name__ if layers else 'nothing'
        raise BoundError(f'the last module of the model must be nn.Linear (the logits), not {last}: '
                         'an activation after the logits would void the worst-case translation')


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
    """Bool [B] from a BoundOutput: correct clean prediction, finite Lipschitz product and worst-case
    logits, and the label's worst-case logit first by more than the margin (``MARGIN_RTOL``)."""
    return (correct_predictions(out.logits, y) & torch.isfinite(out.lipschitz)
            & strictly_first(out.worst, y, MARGIN_RTOL))


def bound_outputs(model, x, y, eps, *, sniter, opt_iter, store=None, index=None, gloro=False,
                  bound='local', sp_thres=None, layout='label', power_grad='unrolled', method='power',
                  translation='iterative', tol=None):
    """One bound pass: clean logits, worst-case logits, Lipschitz product and sparsity term (plus
    the per-layer norms and the fractions of varying neurons, see ``BoundOutput``).

    ``store``/``index``: per-example start vectors (read, then written back).
    ``method``: per-sample masked norms by 'power' iteration (the authors': at most ``sniter``
    rounds, one early stop for the batch at ``tol``, default 1e-3) or 'lanczos' (at most
    ``sniter`` steps of the same cost, each sample stopping at relative Ritz residual ``tol``,
    default 1e-4; never below power iteration from the same start).
    ``translation``: the last-layer solver, 'iterative' (``opt_iter`` rounds of the authors'
    clip-and-rescale) or 'exact' (``last_layer.exact_solver``; ``opt_iter`` unused).
    ``layout``: 'label' solves only the B x C problems the worst-case logits need; 'pairwise'
    solves all B x C x C (the authors' layout) and takes the label column.
    ``power_grad``: how gradients pass the power iterations, 'unrolled' or 'final' (see
    ``masked_spectral_norm``); values are the same either way.
    """
    if bound not in ('local', 'global'):
        raise ValueError(f"bound must be 'local' or 'global', not {bound!r}")
    for name, value, allowed in (('method', method, METHODS), ('translation', translation, TRANSLATIONS),
                                 ('layout', layout, LAYOUTS)):
        if value not in allowed:
            raise ValueError(f'{name} must be one of {allowed}, not {value!r}')
    options = PassOptions(sniter=sniter, sp_thres=sp_thres, power_grad=power_grad, method=method, tol=tol)
    state = propagate(model, x, eps, options)
    product, finals, norms = lipschitz_product(state, options, bound=bound, store=store, index=index)
    if store is not None and finals:
        store.scatter(index, finals)
    last = list(model)[-1]
    logits = last(state.centre)
    column = label_column(last.weight, y, state, per_sample_eps(eps, x) * product, opt_iter, layout=layout,
                          translation=translation)
    sparsity = state.sparsity if torch.is_tensor(state.sparsity) else logits.new_zeros(())
    global_product = math.prod(rec.global_sigma for rec in state.records) if state.records else logits.new_ones(())
    return BoundOutput(logits, translate(logits, y, column, gloro), product, sparsity, norms, state.varying,
                       global_product)


def worst_case_logits(model, x, y, eps, *, sniter, opt_iter, store=None, index=None, gloro=False,
                      bound='local'):
    """Differentiable worst-case logits [B, C] (or [B, C+1] with ``gloro``) in the eps-ball of x."""
    return bound_outputs(model, x, y, eps, sniter=sniter, opt_iter=opt_iter, store=store, index=index,
                         gloro=gloro, bound=bound).worst


@torch.no_grad()
def certify(model, x, y, eps, *, sniter=2000, opt_iter=1000, bound='local', store=None, index=None,
            method='power', translation='iterative', layout='label'):
    """Bool [B]: True where the example is certified (see ``certified_predictions``).

    The defaults are the authors' procedure (power iteration, clip-and-rescale);
    ``method='lanczos', translation='exact'`` certifies faster with bounds at least as tight.
    """
    out = bound_outputs(model, x, y, eps, sniter=sniter, opt_iter=opt_iter, bound=bound, store=store,
                        index=index, method=method, translation=translation, layout=layout)
    return certified_predictions(out, y)


@torch.no_grad()
def local_lipschitz(model, x, eps, *, sniter=2000, method='power'):
    """[B]: product of the masked spectral norms of every conv/linear layer but the last."""
    options = PassOptions(sniter=sniter, method=method)
    state = propagate(model, x, eps, options)
    return lipschitz_product(state, options)[0]


@torch.no_grad()
def layer_norms(model, x, eps, *, method='power', sniter=2000, tol=None, precise=False, rtol=1e-6):
    """{affine layer index: per-sample masked norm [B]} of every conv/linear layer but the last,
    on the masks of one bound pass at ``eps`` (global norms by ``sniter`` power iterations).

    ``precise=False``: the norms a certification with ``method``/``sniter``/``tol`` multiplies
    (fresh random starts). ``precise=True``: ``spectral.precise_masked_norms`` of the same masks
    (float64; explicit SVD for small layers, else Lanczos with full re-orthogonalisation to
    relative residual ``rtol``), for a convergence audit.
    """
    options = PassOptions(sniter=sniter, method=method, tol=tol)
    state = propagate(model, x, eps, options)
    if not precise:
        return lipschitz_product(state, options)[2]
    return {rec.index: precise_masked_norms(rec.op, rec.in_mask, rec.out_mask, rtol=rtol,
                                              batch=x.size(0)).to(x.dtype)
            for rec in state.records}


def infer_input_shape(model):
    """The input shape (C, H, W) or (F,) that ``model`` accepts, among the data sets it was built for."""
    first = list(model)[0]
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    for size in (28, 32, 64):
        shape = (first.in_channels, size, size)
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
    training uses move on). ``precise=True``: float64 norms converged to 1e-6
    (``spectral.precise_global_norm``), leaving the training vectors untouched.
    """
    shape = tuple(input_shape) if input_shape is not None else infer_input_shape(model)
    x = _probe(model, shape)
    product = 1.0
    for layer in list(model)[:-1]:
        if is_affine(layer):
            op = make_operator(layer, x.shape[1:])
            norm = precise_global_norm(op)[0] if precise else global_spectral_norm(op, sniter)
            product *= float(norm)
        x = layer(x)
    return product


class BoundedModel(nn.Module):
    """Wraps a Sequential so that one forward (and so DistributedDataParallel) covers the bound pass.

    ``forward(x)`` is the plain model; ``forward(x, y, eps, **options)`` returns the fields of
    ``bound_outputs`` as a tuple (logits, worst, lipschitz, sparsity).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y=None, eps=None, **options):
        if eps is None:
            return self.model(x)
        out = bound_outputs(self.model, x, y, eps, **options)
        return out.logits, out.worst, out.lipschitz, out.sparsity
