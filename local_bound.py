"""Local-Lip bound propagation (SPEC sections 2-3).

A ball (centre, L2 radius) and a box (lower, upper) flow through the layers of an ``nn.Sequential``;
each layer type has one rule, looked up by type in ``RULES``. Affine layers are recorded with the
masks of varying neurons around them; after the pass, the masked spectral norm of every recorded
layer is estimated per sample by power iteration and their product is the local Lipschitz bound.
The last Linear layer turns ball and box into worst-case logits (the BCP translation).
"""
import math
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import ClampGroupSort, Flatten, ReLU_x, clamp_maxmin, relu_x

EPS = 1e-12
LOCAL_TOL = 1e-3     # early stop of the per-sample masked power iteration
GLOBAL_TOL = 1e-4    # early stop of the global power iteration


# ----------------------------------------------------------------------------- affine operators

def batch_norms(t):
    """L2 norm of every sample of a batch, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


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

    def row_norms(self):
        return self.layer.weight.norm(dim=1).view(1, -1)


OPERATORS = {nn.Conv2d: ConvOperator, nn.Linear: LinearOperator}


def make_operator(layer, in_shape):
    return OPERATORS[type(layer)](layer, in_shape)


def is_affine(layer):
    return type(layer) in OPERATORS


# ----------------------------------------------------------------------------- power iteration

_global_vectors = weakref.WeakKeyDictionary()   # layer -> persistent start vector (warm start)


def global_vectors_state(model):
    """{layer index: persistent global power-iteration vector} of ``model`` (for checkpoints)."""
    return {i: _global_vectors[layer].cpu() for i, layer in enumerate(model) if layer in _global_vectors}


def load_global_vectors(model, state):
    device = next(model.parameters()).device
    for i, u in state.items():
        _global_vectors[model[int(i)]] = u.to(device)


def global_spectral_norm(op, iters, tol=GLOBAL_TOL):
    """||W||_2 of the operator by power iteration, warm-started from the layer's last vector."""
    u = _global_vectors.get(op.layer)
    weight = op.layer.weight
    if u is None or u.shape[1:] != op.in_shape or u.device != weight.device:
        u = torch.randn(1, *op.in_shape, device=weight.device, dtype=weight.dtype)
    sigma, u = _power_iteration(op, u, None, None, iters, tol)
    _global_vectors[op.layer] = u.detach()
    return sigma[0]


def masked_spectral_norm(op, u, in_mask, out_mask, iters, tol=LOCAL_TOL):
    """Per-sample ``||D_out W D_in||_2`` by power iteration from start vectors ``u`` [B, *in_shape].

    Gradients flow through the iterations (masks are constants). Returns (sigma [B], final u).
    """
    return _power_iteration(op, u, in_mask, out_mask, iters, tol)


def _power_iteration(op, u, in_mask, out_mask, iters, tol):
    """Alternate ``v = normalise(D_out W D_in u)``, ``u = normalise(D_in W^T v)``.

    Stops after ``iters`` rounds or once no sample's ``u`` moved by ``tol`` or more. The estimate
    ``<v, D_out W D_in u>`` equals ``|D_in W^T v|^2 / (|D_in W^T v| + EPS)`` for the final u, so it
    costs no extra operator application.
    """
    for it in range(iters):
        previous = u
        if in_mask is not None:
            u = u * in_mask
        out = op.linear(u)
        if out_mask is not None:
            out = out * out_mask
        v = out / (batch_norms(out) + EPS)
        back = op.adjoint(v)
        if in_mask is not None:
            back = back * in_mask
        norm = batch_norms(back)
        u = back / (norm + EPS)
        if it + 1 == iters or (u - previous).flatten(1).norm(dim=1).max() < tol:
            break
    norm = norm.flatten()
    return norm * norm / (norm + EPS), u


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
    """What flows between layers: ball centre and radius, box, and the current varying mask."""
    centre: torch.Tensor
    radius: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    mask: Optional[torch.Tensor] = None
    records: list = field(default_factory=list)
    sparsity: torch.Tensor = 0.0


@dataclass
class PassOptions:
    sniter: int
    sp_thres: Optional[float] = None   # sparsity term wanted (TinyImageNet); None = skip


def affine_rule(layer, index, state, options):
    op = make_operator(layer, state.centre.shape[1:])
    box_mid = op.affine((state.lower + state.upper) * 0.5)
    box_rad = op.absolute((state.upper - state.lower) * 0.5)
    centre = op.affine(state.centre)
    ball_rad = state.radius.view(-1, *([1] * (centre.dim() - 1))) * op.row_norms()
    lower = torch.maximum(box_mid - box_rad, centre - ball_rad)
    upper = torch.minimum(box_mid + box_rad, centre + ball_rad)
    sigma = global_spectral_norm(op, options.sniter)
    state.records.append(AffineRecord(index, op, sigma, in_mask=state.mask))
    return BoundState(centre, state.radius * sigma, lower, upper, None, state.records, state.sparsity)


def _activation_step(state, act, mask, out_mask, sparsity, elementwise=True):
    """Shared part of every activation rule: box through ``act`` intersected with the ball's box.

    For an elementwise non-decreasing ``act``, ``max(act(l), act(m - r)) = act(max(l, m - r))``
    (and likewise for the upper bound), so the intersection is taken before the activation.
    """
    r = state.radius.view(-1, *([1] * (state.centre.dim() - 1)))
    if elementwise:
        lower = act(torch.maximum(state.lower, state.centre - r))
        upper = act(torch.minimum(state.upper, state.centre + r))
    else:
        lower = torch.maximum(act(state.lower), act(state.centre - r))
        upper = torch.minimum(act(state.upper), act(state.centre + r))
    if out_mask:
        state.records[-1].out_mask = mask
    return BoundState(act(state.centre), state.radius, lower, upper, mask, state.records,
                      state.sparsity + sparsity)


def relux_rule(layer, index, state, options):
    theta = layer.threshold
    mask = ((state.lower <= theta) & (state.upper > 0)).to(state.centre.dtype)
    sparsity = 0.0
    if options.sp_thres is not None:
        sparsity = F.relu(state.upper).mean() + options.sp_thres * F.relu(theta - state.lower).mean()
    return _activation_step(state, lambda t: relu_x(t, theta), mask, True, sparsity)


def relu_rule(layer, index, state, options):
    mask = (state.upper > 0).to(state.centre.dtype)
    sparsity = F.relu(state.upper).mean() if options.sp_thres is not None else 0.0
    return _activation_step(state, F.relu, mask, True, sparsity)


def maxmin_rule(layer, index, state, options):
    act = lambda t: clamp_maxmin(t, layer.max, layer.min)  # noqa: E731
    new = _activation_step(state, act, None, False, 0.0, elementwise=False)
    high_lower, _ = new.lower.split(new.lower.size(1) // 2, dim=1)
    _, low_upper = new.upper.split(new.upper.size(1) // 2, dim=1)
    fixed = torch.cat([high_lower >= layer.max, low_upper <= layer.min], dim=1)
    new.mask = (~fixed).to(state.centre.dtype)
    if options.sp_thres is not None:
        new.sparsity = new.sparsity + F.relu(layer.max - high_lower).mean() + F.relu(low_upper - layer.min).mean()
    return new


def flatten_rule(layer, index, state, options):
    flat = lambda t: None if t is None else t.reshape(t.size(0), -1)  # noqa: E731
    return BoundState(flat(state.centre), state.radius, flat(state.lower), flat(state.upper),
                      flat(state.mask), state.records, state.sparsity)


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


def propagate(model, x, eps, options):
    """Carry ball and box from the input to the penultimate layer. Returns the final BoundState."""
    radius = torch.full((x.size(0),), float(eps), device=x.device, dtype=x.dtype)
    state = BoundState(x, radius, x - eps, x + eps)
    for index, layer in enumerate(list(model)[:-1]):
        state = rule_for(layer)(layer, index, state, options)
    return state


# ----------------------------------------------------------------------------- per-example store

def affine_input_shapes(model, input_shape):
    """{layer index: input shape} for every conv/linear layer but the last."""
    shapes, x = {}, torch.zeros(1, *input_shape, device=next(model.parameters()).device)
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
    """Per-sample product of the norms of the recorded layers, and the final start vectors.

    ``bound='global'`` uses every layer's global norm. With a store, its layers use their stored
    start vectors and the other layers contribute their global norm (TinyImageNet's partial
    stores); without one, every layer starts from fresh random vectors.
    """
    batch = state.centre.size(0)
    product = torch.ones(batch, device=state.centre.device, dtype=state.centre.dtype)
    starts = store.gather(index, state.centre.device, state.centre.dtype) if store is not None else {}
    finals = {}
    for rec in state.records:
        if bound == 'global' or (store is not None and rec.index not in store):
            product = product * rec.global_sigma
            continue
        u = starts.get(rec.index)
        if u is None:
            u = torch.randn(batch, *rec.op.in_shape, device=product.device, dtype=product.dtype)
        sigma, u = masked_spectral_norm(rec.op, u, rec.in_mask, rec.out_mask, options.sniter)
        finals[rec.index] = u
        product = product * sigma
    return product, finals


# ----------------------------------------------------------------------------- last layer

def clip_and_rescale(directions, lower, upper, radius, active, opt_iter):
    """``max <w, d>`` s.t. ``|d| <= radius``, ``lower <= d <= upper`` for every direction w.

    directions [B, K, h]; lower/upper [B, 1, h] with lower <= 0 <= upper; radius [B]; active [B, K, 1]
    (0 marks a trivial problem, w = 0). Starts at ``radius * w/|w|`` and, while some coordinate
    leaves the box (at most ``opt_iter`` rounds), clips those to the box and rescales the free ones
    so that ``|d| = radius``. Returns the inner products [B, K] (an upper estimate of the optimum).
    """
    r = radius.view(-1, 1, 1)
    d = r * F.normalize(directions, p=2, dim=-1)
    target = active * (r + EPS) + EPS
    trivial = 1.0 - active
    for it in range(opt_iter):
        if it > 0 and not ((active * d < lower) | (active * d > upper)).any():
            break
        at_lower, at_upper = (d <= lower).to(d.dtype), (d >= upper).to(d.dtype)
        before = active * d * at_lower + active * d * at_upper
        after = active * lower * at_lower + active * upper * at_upper
        norm_before = (active * (before + EPS)).norm(dim=-1, keepdim=True)
        norm_after = (active * (after + EPS)).norm(dim=-1, keepdim=True)
        free_before = torch.sqrt(torch.clamp(target ** 2 - norm_before ** 2, min=0) + EPS + trivial)
        free_after = torch.sqrt(torch.clamp(target ** 2 - norm_after ** 2, min=0) + EPS + trivial)
        inside = ((d > lower) & (d < upper)).to(d.dtype)
        d = after + (free_after / (free_before + EPS)) * active * d * inside
    return (directions * d).sum(-1)


def _relative_box(state):
    lower = torch.clamp(state.lower - state.centre, max=0).unsqueeze(1)
    upper = torch.clamp(state.upper - state.centre, min=0).unsqueeze(1)
    return lower, upper


def label_translation(weight, y, state, radius, opt_iter):
    """``T[b, j] = max <W_j - W_y, d>`` over the ball-and-box set, for the true label only: [B, C]."""
    classes = weight.size(0)
    directions = weight.unsqueeze(0) - weight[y].unsqueeze(1)
    active = (torch.arange(classes, device=y.device) != y.unsqueeze(1)).to(weight.dtype).unsqueeze(-1)
    lower, upper = _relative_box(state)
    t = clip_and_rescale(directions, lower, upper, radius, active, opt_iter)
    return torch.where(torch.isnan(t), torch.zeros_like(t), t)


def pairwise_translation(weight, state, radius, opt_iter):
    """All pairs: ``T[b, i, j] = max <W_i - W_j, d>``, [B, C, C] (the authors' layout, C times the work)."""
    batch, classes = state.centre.size(0), weight.size(0)
    directions = (weight.unsqueeze(1) - weight.unsqueeze(0)).flatten(0, 1).unsqueeze(0).expand(batch, -1, -1)
    active = (1.0 - torch.eye(classes, device=weight.device, dtype=weight.dtype)).view(1, -1, 1)
    lower, upper = _relative_box(state)
    t = clip_and_rescale(directions, lower, upper, radius, active.expand(batch, -1, -1), opt_iter)
    t = t.view(batch, classes, classes)
    return torch.where(torch.isnan(t), torch.zeros_like(t), t)


def translate(logits, y, column, gloro=False):
    """Worst-case logits ``z_j + T[j, y]`` (j != y), or GloRo's ``[z, max_{j!=y} z~_j]``."""
    off = torch.ones_like(logits).scatter_(1, y.unsqueeze(1), 0.0)
    worst = logits + column * off
    if not gloro:
        return worst
    bottom = worst.masked_fill(off == 0, float('-inf')).max(dim=1, keepdim=True).values
    return torch.cat([logits, bottom], dim=1)


# ----------------------------------------------------------------------------- public API

@dataclass
class BoundOutput:
    logits: torch.Tensor        # clean logits (the ball centre through the last layer)
    worst: torch.Tensor         # worst-case logits [B, C] (or [B, C+1] with gloro)
    lipschitz: torch.Tensor     # per-sample product of the layer norms [B]
    sparsity: torch.Tensor      # TinyImageNet sparsity term (0 unless sp_thres is given)


def bound_outputs(model, x, y, eps, *, sniter, opt_iter, store=None, index=None, gloro=False,
                  bound='local', sp_thres=None, translation='label'):
    """One bound pass: clean logits, worst-case logits, Lipschitz product and sparsity term.

    ``store``/``index``: per-example start vectors (read, then written back). ``translation``:
    'label' solves only the B x C problems the worst-case logits need; 'pairwise' solves all
    B x C x C (the authors' layout) and takes the label column.
    """
    if bound not in ('local', 'global'):
        raise ValueError(f"bound must be 'local' or 'global', not {bound!r}")
    options = PassOptions(sniter=sniter, sp_thres=sp_thres)
    state = propagate(model, x, eps, options)
    product, finals = lipschitz_product(state, options, bound=bound, store=store, index=index)
    if store is not None and finals:
        store.scatter(index, finals)
    last = list(model)[-1]
    logits = last(state.centre)
    radius = eps * product
    if translation == 'label':
        column = label_translation(last.weight, y, state, radius, opt_iter)
    elif translation == 'pairwise':
        table = pairwise_translation(last.weight, state, radius, opt_iter)
        column = table.gather(2, y.view(-1, 1, 1).expand(-1, table.size(1), 1)).squeeze(2)
    else:
        raise ValueError(f"translation must be 'label' or 'pairwise', not {translation!r}")
    sparsity = state.sparsity if torch.is_tensor(state.sparsity) else logits.new_zeros(())
    return BoundOutput(logits, translate(logits, y, column, gloro), product, sparsity)


def worst_case_logits(model, x, y, eps, *, sniter, opt_iter, store=None, index=None, gloro=False,
                      bound='local'):
    """Differentiable worst-case logits [B, C] (or [B, C+1] with ``gloro``) in the eps-ball of x."""
    return bound_outputs(model, x, y, eps, sniter=sniter, opt_iter=opt_iter, store=store, index=index,
                         gloro=gloro, bound=bound).worst


@torch.no_grad()
def certify(model, x, y, eps, *, sniter=2000, opt_iter=1000, bound='local', store=None, index=None):
    """Bool [B]: True where the worst-case logits still rank the true label first."""
    worst = bound_outputs(model, x, y, eps, sniter=sniter, opt_iter=opt_iter, bound=bound,
                          store=store, index=index).worst
    return worst.argmax(dim=1) == y


@torch.no_grad()
def local_lipschitz(model, x, eps, *, sniter=2000):
    """[B]: product of the masked spectral norms of every conv/linear layer but the last."""
    options = PassOptions(sniter=sniter)
    state = propagate(model, x, eps, options)
    return lipschitz_product(state, options)[0]


def infer_input_shape(model):
    """The input shape (C, H, W) or (F,) that ``model`` accepts, among the data sets it was built for."""
    first = list(model)[0]
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    device = next(model.parameters()).device
    for size in (28, 32, 64):
        shape = (first.in_channels, size, size)
        try:
            with torch.no_grad():
                model(torch.zeros(1, *shape, device=device))
            return shape
        except RuntimeError:
            continue
    raise ValueError('cannot infer the input shape; pass input_shape=(C, H, W)')


@torch.no_grad()
def global_lipschitz(model, *, sniter=2000, input_shape=None):
    """Product of the plain spectral norms of every conv/linear layer but the last."""
    shape = tuple(input_shape) if input_shape is not None else infer_input_shape(model)
    x = torch.zeros(1, *shape, device=next(model.parameters()).device)
    product = 1.0
    for layer in list(model)[:-1]:
        if is_affine(layer):
            product *= float(global_spectral_norm(make_operator(layer, x.shape[1:]), sniter))
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
