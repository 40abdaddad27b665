"""The one bound pass (docs/method.md §2-3): a ball and a box flow through the layers of the chain,
each by its rule in ``RULES``; guaranteed settings run it on a float64 copy with outward rounding."""
import torch

from checks import boundable, check_boundable, check_input_shapes, per_sample_eps
from composition import affine_input_shapes, has_sums
from norm_providers import PassNorms, fresh_starts, global_norm_bounds
from operators import is_affine
from rounding import down, exact_float64_kernels, float64_copy, up
from rules import RULES, BoundState, PassOptions
from activations import ACTIVATIONS
from settings import CERTIFIED, BoundError, checked_settings


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
    settings = checked_settings(settings)
    if has_sums(model) and settings.refines:
        raise BoundError('the refined bound follows plain chains; a model with residual blocks takes the local '
                         'or the global bound')
    if global_norms is None and settings.guaranteed:
        global_norms = global_norm_bounds(model, x.shape[1:], settings)
    options = PassOptions(settings, global_norms, rigorous=settings.guaranteed)
    radius = per_sample_eps(eps, x, torch.float64 if options.rigorous else None).clone()
    if options.rigorous:
        model, x, radius = float64_copy(model), x.double(), radius.double()
        shaped = radius.view(-1, *([1] * (x.dim() - 1)))
        state = BoundState(x, radius, down(x - shaped), up(x + shaped), centre_err=torch.zeros_like(x))
    else:
        shaped = radius.view(-1, *([1] * (x.dim() - 1)))
        state = BoundState(x, radius, x - shaped, x + shaped)
    state.layout = model if has_sums(model) else None
    with exact_float64_kernels(x.device, options.rigorous):
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


def guaranteed_refined(settings):
    """True when the per-sample norms are guaranteed and taken during the pass (refined 'radius')."""
    return settings.guaranteed and 'radius' in settings.refines


def masked_settings(settings):
    """``settings`` with a local bound where they ask for the global one (masked norms wanted)."""
    return settings.replace(bound='local') if settings.bound == 'global' else settings
