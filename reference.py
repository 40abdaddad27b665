"""An independent float64 reference of the certificate, for audits and fuzzing.

Nothing here calls the bound pass (``local_bound``, ``guaranteed``, ``spectral``, ``last_layer``):
every conv/linear layer becomes an explicit float64 matrix, the boxes come from this module's own
interval arithmetic, the masks from its own reading of which outputs are constant on the box, the
norms from the SVD of the explicit masked matrices and the last layer from its own solver. It only
applies to models whose layers are small enough to form (``DEFAULT_LIMIT`` entries per matrix).

**What it computes** (per sample, for the L2 ball of radius eps around x). Between two affine
layers the activations form a *chain* ``g`` (ReLU, ReLUθ, clipped MaxMin, Flatten, in any order
and number). The reference tracks, for every position of the chain:

* ``varying``: the output is not constant on the box (a constant output is one whose interval has
  width 0; a position that was constant stays constant through an elementwise activation);
* the *group* of the position: clipped MaxMin merges the groups of its two inputs, so a group is a
  set of positions whose outputs may depend on each other's pre-activations;
* ``alive``: the pre-activation positions that may still move an output; a group whose outputs
  are all constant drops its positions.

Then ``||g(z) - g(z')||_2 <= ||D_out (z - z')||_2`` for pre-activations z, z' in the box, with
``D_out`` the alive positions of the groups that hold a varying output (each activation is
1-Lipschitz, elementwise or on its pairs, and a constant group contributes nothing). With ``D_in``
the varying positions of the chain before layer k, ``||D_out W_k D_in||_2`` bounds how far the
layer and its chain move a point of the reachable set (docs/method.md §2 and §7 state the same for
one activation per layer). The ball's radius follows these per-sample norms (§7 'radius'), the
box of an affine layer uses the masked row norms ``||W_j D_in||_2`` (§7 'rows'), and within a
chain the radius is updated after every activation. These boxes and masks are never looser than
those of a correct bound pass (local or refined), so a certificate of the pass that this
reference does not confirm, or a per-sample norm of the pass below this reference's, is a bug.

``tolerance`` > 0 counts an interval narrower than ``tolerance * (1 + |end|)`` as constant: masks
that float32 rounding of the pass cannot undercut, for comparing norms only (not sound).
"""
import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import ClampGroupSort, Flatten, ReLU_x

DT = torch.float64
DEFAULT_LIMIT = 2**20          # largest explicit matrix (entries) the reference forms
CONFIRM_RTOL = 1e-9            # a reference certificate needs this relative logit margin
ELEMENTWISE = (nn.ReLU, ReLU_x)
FLATTENS = (Flatten, nn.Flatten)


class ReferenceError(ValueError):
    """A model the reference cannot check (unsupported layer, or a matrix above the size limit)."""


# ----------------------------------------------------------------------------- the model as matrices

@dataclass
class Step:
    """One layer of the model with the shapes around it; ``matrix``/``bias`` for affine layers."""
    index: int
    layer: nn.Module
    in_shape: tuple
    out_shape: tuple
    matrix: torch.Tensor = None
    bias: torch.Tensor = None
    pairs: tuple = None         # MaxMin: (flat positions of the first half, of the second half)


def explicit_affine(layer, in_shape):
    """(matrix [out, in], bias [out]) of a Linear or Conv2d on inputs of ``in_shape``, float64,
    the matrix built column by column from the basis vectors."""
    weight = layer.weight.detach().to(device='cpu', dtype=DT)
    bias = layer.bias.detach().to(device='cpu', dtype=DT) if layer.bias is not None else None
    if isinstance(layer, nn.Linear):
        if len(in_shape) != 1:
            raise ReferenceError(f'a Linear layer on an input of shape {in_shape} (flatten it first)')
        return weight.clone(), bias if bias is not None else torch.zeros(weight.size(0), dtype=DT)
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=DT).view(n, *in_shape)
    columns = F.conv2d(basis, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    matrix = columns.reshape(n, -1).t().contiguous()
    out_channels, spatial = columns.shape[1], columns[0, 0].numel()
    full_bias = (bias if bias is not None else torch.zeros(out_channels, dtype=DT)).repeat_interleave(spatial)
    return matrix, full_bias


def _checked_layer(index, layer):
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != 'zeros' or isinstance(layer.padding, str):
            raise ReferenceError(f'layer {index}: only numeric zero padding is modelled')
    elif not isinstance(layer, (nn.Linear, ClampGroupSort, *ELEMENTWISE, *FLATTENS)):
        raise ReferenceError(f'layer {index} ({type(layer).__name__}): not modelled by the reference')
    if isinstance(layer, nn.Flatten) and (layer.start_dim != 1 or layer.end_dim != -1):
        raise ReferenceError(f'layer {index}: Flatten must flatten every dimension but the batch')


def _walk(model, input_shape, limit):
    """(index, layer, input shape, output shape) of every layer, checked: ReferenceError when a
    layer is not modelled, the last one is not Linear, or an affine layer's matrix has more than
    ``limit`` entries."""
    layers = list(model)
    if not layers or type(layers[-1]) is not nn.Linear:
        raise ReferenceError('the last layer must be nn.Linear')
    shape = tuple(input_shape)
    for index, layer in enumerate(layers):
        _checked_layer(index, layer)
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            with torch.no_grad():
                probe = torch.zeros(1, *shape, dtype=layer.weight.dtype, device=layer.weight.device)
                out_shape = tuple(layer(probe).shape[1:])
            if math.prod(shape) * math.prod(out_shape) > limit:
                raise ReferenceError(f'layer {index}: a {math.prod(out_shape)} x {math.prod(shape)} matrix is '
                                     f'above the reference limit of {limit} entries')
        elif isinstance(layer, FLATTENS):
            out_shape = (math.prod(shape),)
        else:
            if isinstance(layer, ClampGroupSort) and shape[0] % 2:
                raise ReferenceError(f'layer {index}: MaxMin on an odd number of channels ({shape[0]})')
            out_shape = shape
        yield index, layer, shape, out_shape
        shape = out_shape


def model_steps(model, input_shape, limit=DEFAULT_LIMIT):
    """The layers of ``model`` as ``Step``s (explicit matrices for the affine ones; ``_walk``'s
    ReferenceError when the reference does not apply)."""
    steps = []
    for index, layer, shape, out_shape in _walk(model, input_shape, limit):
        step = Step(index, layer, shape, out_shape)
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            step.matrix, step.bias = explicit_affine(layer, shape)
        elif isinstance(layer, ClampGroupSort):
            grid = torch.arange(math.prod(shape)).view(shape)
            step.pairs = (grid[:shape[0] // 2].flatten(), grid[shape[0] // 2:].flatten())
        steps.append(step)
    return steps


def cannot_check(model, input_shape, limit=DEFAULT_LIMIT):
    """Why the reference cannot check ``model`` (an unmodelled layer, a matrix above ``limit``
    entries), or '' when it can."""
    try:
        for _ in _walk(model, input_shape, limit):
            pass
    except (ReferenceError, RuntimeError) as error:
        return str(error)
    return ''


def float64_copy(model):
    """A float64 copy of ``model`` on the CPU in eval mode, without gradients for its parameters
    (the real-valued function of the stored weights, up to float64 rounding)."""
    twin = copy.deepcopy(model).to(device='cpu', dtype=DT).eval()
    twin.requires_grad_(False)
    return twin


# ----------------------------------------------------------------------------- norms of masked matrices

def masked_norms(matrix, in_mask, out_mask=None):
    """Per sample ``||diag(out_mask) matrix diag(in_mask)||_2`` [B] (float64 SVD of the rows and
    columns the masks keep; an empty one is 0)."""
    values = []
    for b in range(in_mask.size(0)):
        rows = slice(None) if out_mask is None else out_mask[b].nonzero().squeeze(1)
        sub = matrix[rows][:, in_mask[b].nonzero().squeeze(1)]
        values.append(torch.linalg.svdvals(sub)[0] if sub.numel() else sub.new_zeros(()))
    return torch.stack(values) if values else matrix.new_zeros(0)


def global_norm(matrix):
    """``||matrix||_2`` (float64 SVD)."""
    return float(torch.linalg.svdvals(matrix)[0]) if matrix.numel() else 0.0


# ----------------------------------------------------------------------------- the pass

@dataclass
class ReferenceBounds:
    """What the reference pass found for a batch: the penultimate centre, box and ball radius, and
    per affine layer (all but the last) its masks and per-sample norm."""
    centre: torch.Tensor                                   # [B, h]
    lower: torch.Tensor
    upper: torch.Tensor
    radius: torch.Tensor                                   # [B]
    norms: dict = field(default_factory=dict)              # {layer index: [B]}
    in_masks: dict = field(default_factory=dict)           # {layer index: bool [B, in]}
    out_masks: dict = field(default_factory=dict)          # {layer index: bool [B, out]}


class _Chain:
    """The bookkeeping of one chain of activations after an affine layer (module docstring):
    ``varying`` [B, n], static ``groups`` [n] (labels), ``alive`` [B, n], and ``sigma`` [B], the
    norm of the affine layer before with the chain's current ``out_mask`` (None: no activation yet)."""

    def __init__(self, batch, n, device):
        self.varying = torch.ones(batch, n, dtype=torch.bool, device=device)
        self.alive = torch.ones(batch, n, dtype=torch.bool, device=device)
        self.groups = torch.arange(n, device=device)
        self.sigma = None

    def group_any(self, flags):
        """Per position: whether any position of its group has ``flags`` [B, n]."""
        index = self.groups.expand_as(flags)
        per_group = torch.zeros_like(flags, dtype=torch.int8).scatter_reduce(1, index, flags.to(torch.int8), 'amax')
        return per_group.gather(1, index).bool()

    def settle(self):
        """Drop the positions of groups whose outputs are all constant."""
        self.alive &= self.group_any(self.varying)

    def merge(self, first, second):
        """MaxMin pairs ``first[i]`` with ``second[i]``: their groups become one."""
        groups = self.groups.clone()
        for p, q in zip(first.tolist(), second.tolist()):
            gp, gq = int(groups[p]), int(groups[q])
            if gp != gq:
                groups[groups == gq] = gp
        self.groups = groups

    def out_mask(self):
        """``D_out``: the alive positions of the groups holding a varying output."""
        return self.alive & self.group_any(self.varying)


def constant(lower, upper, tolerance):
    """Bool: the interval [lower, upper] has width 0 (or below ``tolerance`` relative to its ends)."""
    if tolerance <= 0:
        return upper <= lower
    scale = 1.0 + torch.maximum(lower.abs(), upper.abs())
    return upper - lower <= tolerance * scale


class Reference:
    """The float64 reference of one model (module docstring); ReferenceError when it does not apply."""

    def __init__(self, model, input_shape, limit=DEFAULT_LIMIT):
        self.steps = model_steps(model, input_shape, limit)
        self.model = float64_copy(model)
        self.layers = list(self.model)
        self.input_shape = tuple(input_shape)

    @torch.no_grad()
    def bounds(self, x, eps, tolerance=0.0):
        """``ReferenceBounds`` of the batch ``x`` (any dtype) at ``eps`` (a number or [B])."""
        x = x.detach().to(device='cpu', dtype=DT).flatten(1)
        batch = x.size(0)
        radius = torch.as_tensor(eps, dtype=DT).expand(batch).clone()
        centre, lower, upper = x, x - radius[:, None], x + radius[:, None]
        out = ReferenceBounds(None, None, None, None)
        chain, pending = _Chain(batch, x.size(1), x.device), None
        for step in self.steps[:-1]:
            layer = self.layers[step.index]
            if step.matrix is not None:
                if pending is not None:
                    radius = self._close(pending, chain, out)
                in_mask = chain.varying.clone()
                centre, lower, upper, reach = self._affine(step, in_mask, centre, lower, upper, radius)
                pending = (step, in_mask, radius)
                radius = reach
                chain = _Chain(batch, step.matrix.size(0), x.device)
            elif isinstance(layer, FLATTENS):
                continue
            else:
                lower, upper, centre = self._activation(step, layer, chain, centre, lower, upper, radius, tolerance)
                if pending is not None:         # the ball after the chain so far (module docstring)
                    step_in, in_mask, radius_in = pending
                    chain.sigma = masked_norms(step_in.matrix, in_mask, chain.out_mask())
                    radius = radius_in * chain.sigma
        if pending is not None:
            radius = self._close(pending, chain, out)
        out.centre, out.lower, out.upper, out.radius = centre, lower, upper, radius
        return out

    @staticmethod
    def _affine(step, in_mask, centre, lower, upper, radius):
        """Interval arithmetic intersected with the ball's box ``c_j +/- r ||W_j D_in||``; returns
        the new centre, box and the radius of the pre-activation ball ``r ||W D_in||``."""
        m, b = step.matrix, step.bias
        mid, half = (lower + upper) / 2, (upper - lower) / 2
        box_mid, box_half = mid @ m.t() + b, half @ m.abs().t()
        new_centre = centre @ m.t() + b
        rows = (in_mask.to(DT) @ (m * m).t()).sqrt()
        ball = radius[:, None] * rows
        new_lower = torch.maximum(box_mid - box_half, new_centre - ball)
        new_upper = torch.minimum(box_mid + box_half, new_centre + ball)
        return new_centre, new_lower, new_upper, radius * masked_norms(m, in_mask)

    def _activation(self, step, layer, chain, centre, lower, upper, radius, tolerance):
        """Box, centre and chain bookkeeping through one activation (the ball's box first)."""
        low = torch.maximum(lower, centre - radius[:, None])
        high = torch.minimum(upper, centre + radius[:, None])
        shaped = lambda t: t.view(t.size(0), *step.in_shape)  # noqa: E731
        new_centre = layer(shaped(centre)).flatten(1)
        if isinstance(layer, ELEMENTWISE):             # non-decreasing, elementwise
            new_lower, new_upper = layer(shaped(low)).flatten(1), layer(shaped(high)).flatten(1)
            chain.varying &= ~constant(new_lower, new_upper, tolerance)
        else:
            new_lower, new_upper = _maxmin_box(layer, shaped(low), shaped(high))
            first, second = step.pairs
            either = chain.varying[:, first] | chain.varying[:, second]
            fixed = constant(new_lower, new_upper, tolerance)
            varying = torch.empty_like(chain.varying)
            varying[:, first] = either & ~fixed[:, first]
            varying[:, second] = either & ~fixed[:, second]
            chain.varying = varying
            chain.merge(first, second)
        chain.settle()
        return new_lower, new_upper, new_centre

    def _close(self, pending, chain, out):
        """Record the masks and per-sample norm of the affine layer ``pending`` whose chain ended;
        returns the radius of the ball after it."""
        step, in_mask, radius_in = pending
        out_mask = chain.out_mask()
        sigma = chain.sigma if chain.sigma is not None else masked_norms(step.matrix, in_mask, out_mask)
        out.norms[step.index], out.in_masks[step.index], out.out_masks[step.index] = sigma, in_mask, out_mask
        return radius_in * sigma

    @torch.no_grad()
    def worst_case(self, bounds, y):
        """(clean logits [B, C], worst-case logits [B, C]) at the last layer: ``z_j + max <W_j - W_y, d>``
        over the penultimate ball and box (``ball_box_maximum``)."""
        last = self.steps[-1]
        y = torch.as_tensor(y).long().cpu()
        logits = bounds.centre @ last.matrix.t() + last.bias
        directions = last.matrix.unsqueeze(0) - last.matrix[y].unsqueeze(1)          # [B, C, h]
        low = (bounds.lower - bounds.centre).clamp(max=0).unsqueeze(1)
        high = (bounds.upper - bounds.centre).clamp(min=0).unsqueeze(1)
        shift = ball_box_maximum(directions, low, high, bounds.radius.view(-1, 1))
        shift = shift.scatter(1, y.view(-1, 1), 0.0)
        return logits, logits + shift

    def certified(self, x, y, eps):
        """Bool [B]: the reference certifies (clean prediction right, the label's worst-case logit
        first by more than ``CONFIRM_RTOL (1 + |z_y|)``)."""
        logits, worst = self.worst_case(self.bounds(x, eps), y)
        y = torch.as_tensor(y).long().cpu()
        return _first(logits, y, 0.0) & _first(worst, y, CONFIRM_RTOL)


def _maxmin_box(layer, low, high):
    """Box of the clipped MaxMin for inputs in [low, high] (flattened): each half's max/min of the
    two inputs' intervals, clipped at the layer's thresholds."""
    top, bottom = layer.max.detach().to(DT), layer.min.detach().to(DT)
    low_a, low_b = low.split(low.size(1) // 2, dim=1)
    high_a, high_b = high.split(high.size(1) // 2, dim=1)
    lower = torch.cat([torch.minimum(torch.maximum(low_a, low_b), top),
                       torch.maximum(torch.minimum(low_a, low_b), bottom)], dim=1)
    upper = torch.cat([torch.minimum(torch.maximum(high_a, high_b), top),
                       torch.maximum(torch.minimum(high_a, high_b), bottom)], dim=1)
    return lower.flatten(1), upper.flatten(1)


def _first(scores, y, rtol):
    own = scores.gather(1, y.view(-1, 1)).squeeze(1)
    others = scores.scatter(1, y.view(-1, 1), -math.inf).max(dim=1).values
    return torch.isfinite(scores).all(dim=1) & (own - others > rtol * (1.0 + own.abs()))


# ----------------------------------------------------------------------------- the last layer

def ball_box_maximum(w, lower, upper, radius, iters=200):
    """``max <w, d>`` over ``||d||_2 <= radius`` and ``lower <= d <= upper`` (``lower <= 0 <= upper``)
    for every row of ``w`` [..., h] (float64), never below the optimum.

    The maximiser is ``d(t) = clip(t w, lower, upper)`` at the t where ``||d(t)|| = radius`` (the box
    corner when it fits in the ball); ``||d(t)||`` and ``<w, d(t)>`` grow with t, so bisection
    keeps an upper end t_hi (``||d(t_hi)|| >= radius``) and returns ``<w, d(t_hi)>``.
    """
    w, lower, upper = w.to(DT), lower.to(DT), upper.to(DT)
    radius = torch.as_tensor(radius, dtype=DT)
    corner = torch.where(w > 0, upper, torch.where(w < 0, lower, torch.zeros_like(w)))
    fits_ball = corner.norm(dim=-1) <= radius
    ends = torch.where(w != 0, torch.where(w > 0, upper, lower) / torch.where(w != 0, w, 1.0), 0.0)
    lo = torch.zeros_like(fits_ball, dtype=DT)
    hi = ends.amax(dim=-1).clamp(min=0)         # every moving coordinate clipped: d(hi) is the corner
    for _ in range(iters):
        mid = (lo + hi) / 2
        reaches = _clip(mid, w, lower, upper).norm(dim=-1) >= radius
        hi, lo = torch.where(reaches, mid, hi), torch.where(reaches, lo, mid)
    value = (w * _clip(hi, w, lower, upper)).sum(-1)
    return torch.where(fits_ball, (w * corner).sum(-1), value)


def _clip(t, w, lower, upper):
    return torch.minimum(torch.maximum(t.unsqueeze(-1) * w, lower), upper)


# ----------------------------------------------------------------------------- attacks

def margin_gap(model, x, y):
    """``max_{j != y} z_j - z_y`` per row (>= 0: the label is not strictly first)."""
    z = model(x)
    own = z.gather(1, y.view(-1, 1)).squeeze(1)
    return z.scatter(1, y.view(-1, 1), -math.inf).max(dim=1).values - own


def _project(delta, eps):
    norm = delta.flatten(1).norm(dim=1).clamp(min=1e-300)
    return delta * (eps / norm).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))


def _ball_points(shape, eps, generator, on_sphere):
    """Uniform points of the L2 ball of radius eps [B] (or of its sphere), shaped [B, *shape]."""
    direction = torch.randn(shape, generator=generator, dtype=DT)
    direction = direction / direction.flatten(1).norm(dim=1).clamp(min=1e-300).view(-1, *([1] * (len(shape) - 1)))
    scale = torch.ones(shape[0], dtype=DT) if on_sphere else torch.rand(shape[0], generator=generator, dtype=DT) ** (
        1.0 / math.prod(shape[1:]))
    return direction * (eps * scale).view(-1, *([1] * (len(shape) - 1)))


def attack_gaps(model, x, y, eps, *, steps=100, restarts=4, samples=1000, targeted=True, seed=0):
    """The largest ``max_{j != y} z_j - z_y`` found in the L2 eps-ball around each x (no clipping
    to [0, 1]: the certificate covers the whole ball) for a float64 ``model`` (``float64_copy``):
    PGD on that gap (and, with ``targeted``, on ``z_j - z_y`` for every class j) from the centre
    and from ``restarts - 1`` random starts (half of them on the sphere), projected onto the ball,
    then ``samples`` random points of the ball and of its sphere. [B] float64; >= 0 is a flip."""
    x, y = x.detach().to(device='cpu', dtype=DT), torch.as_tensor(y).long().cpu()
    eps = torch.as_tensor(eps, dtype=DT).expand(x.size(0)).clone()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        best = margin_gap(model, x, y)
    classes = model(x[:1]).size(1)
    goals = [None] + (list(range(classes)) if targeted else [])
    for restart in range(restarts):
        for goal in goals:
            start = torch.zeros_like(x) if restart == 0 else _ball_points(x.shape, eps, generator, restart % 2 == 1)
            best = torch.maximum(best, _pgd(model, x, y, eps, start, goal, steps))
    for k in range(samples):
        points = x + _ball_points(x.shape, eps, generator, on_sphere=k % 2 == 0)
        with torch.no_grad():
            best = torch.maximum(best, margin_gap(model, points, y))
    return best


def _pgd(model, x, y, eps, delta, goal, steps):
    """Normalised-gradient ascent on the gap (or on ``z_goal - z_y``), step eps/4 decaying to
    eps/100; returns the best gap met along the way [B]."""
    shaped = eps.view(-1, *([1] * (x.dim() - 1)))
    best = torch.full((x.size(0),), -math.inf, dtype=DT)
    for t in range(steps):
        delta = delta.detach().requires_grad_(True)
        z = model(x + delta)
        own = z.gather(1, y.view(-1, 1)).squeeze(1)
        gap = z.scatter(1, y.view(-1, 1), -math.inf).max(dim=1).values - own
        best = torch.maximum(best, gap.detach())
        objective = gap if goal is None else z[:, goal] - own
        grad, = torch.autograd.grad(objective.sum(), delta)
        size = 0.25 * (0.04 ** (t / max(steps - 1, 1)))
        norm = grad.flatten(1).norm(dim=1).clamp(min=1e-300).view_as(shaped)
        delta = _project(delta.detach() + size * shaped * grad / norm, shaped.flatten())
    with torch.no_grad():
        return torch.maximum(best, margin_gap(model, x + delta, y))
