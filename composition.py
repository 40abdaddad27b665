"""How a chain composes (docs/graphs.md): layer keys (``3``, ``'4.1.0'`` inside residual blocks),
the product of per-layer norms (a chain multiplies, a block adds its branches), and the affine
layers of a chain with their input shapes."""
import hashlib

import torch

from models import Residual
from operators import is_affine


def layer_key(prefix, j):
    """The key of layer ``j`` of a chain: ``j`` at the top (``prefix`` None), else ``'prefix.j'``."""
    return j if prefix is None else f'{prefix}.{j}'


def keyed_layers(layers, prefix=None):
    """(key, layer) for every layer of the chain in pass order, a residual block followed by the
    layers of its branches."""
    for j, layer in enumerate(layers):
        key = layer_key(prefix, j)
        yield key, layer
        if type(layer) is Residual:
            for b, branch in enumerate(layer.branches):
                yield from keyed_layers(branch, f'{key}.{b}')


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


def probe_input(model, shape):
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
        _walk_affine(list(model)[:-1], probe_input(model, input_shape), None, table)
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
