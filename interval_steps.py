"""The fused elementwise steps of the training pass, as autograd Functions (docs/performance.md)."""
import contextlib

import torch


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


class BallBoxIntersection(torch.autograd.Function):
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


class ClippedBallStep(torch.autograd.Function):
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


def larger(a, b):
    return _Pick.apply(a, b, False)


def smaller(a, b):
    return _Pick.apply(a, b, True)
