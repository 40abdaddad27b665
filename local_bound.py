"""Local-Lip bound propagation: the public API (docs/method.md §2-3, README "From Python").

A ball (centre, L2 radius) and a box (lower, upper) flow through the layers of a chain
(``bound_pass.propagate``; each layer type has one rule in ``rules.RULES``, activations are
registered in ``activations.py``, a user's own module is first rewritten by ``graph.py``). Affine
layers are recorded with the masks of varying neurons around them; the masked spectral norm of every
recorded layer (``norm_providers.py``: estimates, or guaranteed upper bounds) compose into the local
Lipschitz bound (``composition.composed``), and the last Linear layer turns ball and box into
worst-case logits or a rigorous decision (``decision.py``, ``last_layer.py``).

The modules of the pass, from the bottom: ``operators`` (affine layers as operators), ``rounding``
(outward rounding), ``interval_steps`` (fused training steps), ``composition`` (layer keys and how a
chain composes), ``rules`` (the state and the rules), ``activations`` (their rules, checks and
registry), ``checks`` (one-line refusals), ``stores`` (per-example start vectors), ``norm_providers``
(per-layer norms), ``bound_pass`` (the pass), ``decision`` (certificates). This module re-exports
the names the scripts, the tests and the README use.
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

import data_load
import graph
import guaranteed
from activations import (ACTIVATIONS, activation_layers, check_activation, maxmin_rule,
                         monotone_rule, project_parameters, register_activation, relu_rule, relux_rule)
from bound_pass import guaranteed_refined, masked_settings, propagate
from checks import (MAX_EPS, boundable, check_bare_forwards, check_batch, check_boundable,
                    check_finite_parameters, check_input_shapes, check_labels, per_sample_eps)
from composition import (affine_input_shapes, affine_layers, composed, has_sums, key_order, layer_key,
                         layer_seed, operation_count, probe_input)
from decision import (MARGIN_RTOL, certifies_with, correct_predictions, factor_count,
                      global_bound, guaranteed_local_product, guaranteed_refined_product,
                      rigorous_decision, rigorous_radius, strictly_first, worst_case_column)
from interval_steps import BallBoxIntersection, ClippedBallStep, compiled_kernels, larger, smaller
from last_layer import translate
from models import ReLU_x
from norm_providers import (PassNorms, failure_events, fresh_starts, guaranteed_global_norms,
                            lipschitz_product)
from operators import OPERATORS, ConvOperator, LinearOperator, is_affine, make_operator
from rounding import float64_copy
from rules import RULES, AffineRecord, BoundState, PassOptions, register_layer, rule_for, sum_rule
from settings import CERTIFIED, BoundError, checked_settings
from spectral import global_spectral_norm, precise_global_norm, precise_masked_norms
from stores import SingularVectorStore, example_normals, example_seed


# The public API and the names the scripts, the tests and the README read from this module.
__all__ = ['activation_layers', 'ACTIVATIONS', 'affine_input_shapes', 'affine_layers', 'AffineRecord',
           'BallBoxIntersection', 'bound_outputs', 'boundable', 'BoundedModel', 'BoundError', 'BoundOutput',
           'BoundState', 'CERTIFIED', 'certified_predictions', 'certifies_with', 'certify',
           'check_activation', 'check_bare_forwards', 'check_batch', 'check_boundable',
           'check_finite_parameters', 'check_input_shapes', 'check_labels', 'ClippedBallStep',
           'compiled_kernels', 'composed', 'ConvOperator', 'correct_predictions', 'example_normals',
           'example_seed', 'factor_count', 'failure_events', 'float64_copy', 'fresh_starts', 'global_bound',
           'global_lipschitz', 'global_product', 'global_spectral_norm', 'guaranteed',
           'guaranteed_global_norms', 'guaranteed_local_product', 'guaranteed_refined',
           'guaranteed_refined_product', 'has_sums', 'infer_input_shape', 'is_affine', 'key_order', 'larger',
           'layer_key', 'layer_norms', 'layer_seed', 'LinearOperator', 'lipschitz_product',
           'local_lipschitz', 'make_operator', 'MARGIN_RTOL', 'masked_settings', 'MAX_EPS', 'maxmin_rule',
           'monotone_rule', 'operation_count', 'OPERATORS', 'PassNorms', 'PassOptions', 'per_sample_eps',
           'precise_global_norm', 'precise_global_norms', 'precise_masked_norms', 'probe_input',
           'project_parameters', 'propagate', 'register_activation', 'register_layer', 'relu_rule', 'ReLU_x', 'relux_rule',
           'rigorous_decision', 'rigorous_radius', 'rule_for', 'RULES', 'SingularVectorStore', 'smaller',
           'strictly_first', 'sum_rule', 'worst_case_column', 'worst_case_logits']


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
    settings = checked_settings(settings)
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
    if guaranteed_refined(settings):
        product, column, norms, state, certified = guaranteed_refined_product(model, x, y, eps, settings, index)
        return product, column, norms, state, certified
    state = propagate(model, x, eps, settings)
    last = float64_copy(list(model)[-1])
    if settings.bound != 'global':
        product, column, norms, certified = guaranteed_local_product(state, last, y, eps, settings, index)
        return product, column, norms, state, certified
    product, _, norms = lipschitz_product(state, settings)
    certified, column = rigorous_decision(last, y, state, rigorous_radius(eps, product, factor_count(state)))
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
    settings = masked_settings(checked_settings(settings))
    eps = per_sample_eps(eps, x, torch.float64 if settings.guaranteed else None)
    if guaranteed_refined(settings):
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
    settings = masked_settings(checked_settings(settings))
    state = propagate(model, x, eps, settings)
    if precise:
        return {rec.index: precise_masked_norms(rec.op, rec.in_mask, rec.out_mask, rtol=rtol,
                                                  batch=x.size(0)).to(x.dtype)
                for rec in state.records}
    if guaranteed_refined(settings):
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
                model(probe_input(model, shape))
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
