"""One-line refusals before any pass (``BoundError``): inputs, labels, eps, shapes, the model's
layers, hooks, non-finite parameters; and ``boundable``, the user's module as the chain to walk."""
import math

import torch
import torch.nn as nn

import folded
import graph
import spectral
from composition import keyed_layers, layer_key
from models import ClampGroupSort, ConvLike, Flatten, Residual
from operators import is_affine
from rules import RULES, rule_for
from settings import BoundError


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
    if isinstance(layer, (nn.Linear, folded.FoldedLinear)):
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
    for key, layer in keyed_layers(layers[:-1]):
        rule_for(layer, key)
    check_bare_forwards(model)


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
    """Refuse (BoundError, one line naming the layer) a model with a NaN or infinite parameter or
    statistic (a BatchNorm's running mean or variance; not the warm power-iteration vectors)."""
    values = list(model.parameters()) + [b for _, b in _statistics(model)]
    if not values or torch.stack([torch.isfinite(v).all() for v in values]).all():
        return
    for where, layer in _named_layers(model)[1:]:
        named = list(layer.named_parameters()) + _statistics(layer)
        for name, value in named:
            if not torch.isfinite(value).all():
                kind = 'parameter' if isinstance(value, nn.Parameter) else 'statistic'
                raise BoundError(f'{where}: {kind} {name} holds NaN or inf values; no bound holds for it')


def _statistics(module):
    """The floating buffers of ``module`` that the bound reads (every one but the warm vectors)."""
    return [(name, b) for name, b in module.named_buffers()
            if b.is_floating_point() and name.rsplit('.', 1)[-1] != spectral.VECTOR]


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
