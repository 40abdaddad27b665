"""Per-layer norms: estimates (power iteration, Lanczos) multiplied into the Lipschitz product,
guaranteed global norms, the guaranteed per-sample runs checked step by step, and the norms the
refined bound takes during the pass."""
from dataclasses import replace

import torch

import guaranteed
from composition import affine_layers, composed, layer_seed
import graph
from checks import check_boundable, check_finite_parameters
from operators import make_operator
from rounding import float64_copy, up_product
from rules import RULES
from settings import checked_settings
from spectral import masked_norm
from stores import example_normals


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
        if state.layout is None:        # a plain chain multiplies in record order
            product = product * sigma
    if state.layout is not None:
        product = composed(state.layout, sigmas) * product
    return product, finals, norms


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
    return global_norm_bounds(model, input_shape, checked_settings(settings))


def global_norm_bounds(model, input_shape, settings):
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
    """``layer``, or for one that computes its weight from parts (a folded layer, any ConvLike: it
    has ``plain``) a plain float64 layer of its weight computed in float64: that rounding is what the
    norm margins cover (a weight computed in float32 would differ from the real network by more)."""
    return float64_copy(layer).plain() if hasattr(layer, 'plain') else layer


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


class GuaranteedNorms:
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
            self.guaranteed = GuaranteedNorms(starts, settings, batch)

    def settle(self, state):
        """Take the norm of the last recorded layer if not yet taken; the ball's radius follows it."""
        if not state.records or state.records[-1].sigma is not None:
            return state
        rec = state.records[-1]
        rec.sigma = self._norm(rec, state.centre.size(0))
        rigorous = state.centre_err is not None
        radius = up_product(rec.radius_in, rec.sigma) if rigorous else rec.radius_in * rec.sigma
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
