"""A user's network as the chain the bound pass walks (docs/graphs.md).

``as_chain(model, input_shape)`` returns an ``nn.Sequential`` of layers the pass has rules for that
computes what ``model`` computes in eval mode, sharing its parameters:

* an ``nn.Sequential`` of such layers is returned as it is (the zoo, the authors' checkpoints);
* anything else is traced by ``torch.fx`` and rewritten node by node: BatchNorm (eval) folded into
  the Conv2d / Linear before it (``FoldedConv``, ``FoldedLinear``) or, alone, a per-channel map
  (``ChannelScale``); AvgPool2d and AdaptiveAvgPool2d as convolutions of constant weights
  (``PoolConv``); Identity and Dropout (eval) dropped; ``F.relu`` / ``torch.relu`` as ``nn.ReLU``;
  ``torch.flatten(x, 1)`` and ``x.view(x.size(0), -1)`` as ``Flatten``; ``clone`` and
  ``contiguous`` dropped; ``x + conv(x)`` with a
  size-keeping conv as ``LinearResidual``; any other sum ``a(x) + b(x)`` of two chains from a
  common tensor as a ``Residual`` block of the two branches.

Anything else is refused with a one-line ``BoundError`` naming the node. The folded layers compute
their weights from the parts on every use (gradients reach the parts; a float64 copy folds in
float64): see docs/certificates.md, "Floating point", for why the fold's rounding is covered.
"""
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from folded import ChannelScale, FoldedConv, FoldedLinear, PoolConv
from models import ConvLike, Flatten, LinearResidual, Residual, same_size_problem
from settings import BoundError


def as_chain(model, input_shape, rules):
    """``model`` as an ``nn.Sequential`` of layers whose types are in ``rules`` (see the module
    docstring); ``model`` itself when it already is one."""
    if type(model) is nn.Sequential and _all_ruled(model, rules):
        return model
    if not isinstance(model, nn.Module):
        raise BoundError(f'expected an nn.Module, not {type(model).__name__}')
    _check_eval_mode(model)
    graph = _trace(model, rules)
    param = next(model.parameters(), None)
    _shapes(graph, model, input_shape, param)
    chain = nn.Sequential(*_rewrite(graph, rules))
    chain = chain if param is None else chain.to(param.device)
    _check_same_function(chain, model, input_shape, param)
    return chain


def _check_same_function(chain, model, input_shape, param):
    """Refuse a rewrite that does not compute what ``model`` computes on a few random inputs. The
    pass reads the chain as a function of fresh values (``_fresh_values``); an in-place operation on
    a tensor that is read again (``h + relu_(h)``) makes the forward compute something else."""
    like = dict(dtype=param.dtype, device=param.device) if param is not None else {}
    probes = torch.rand(3, *input_shape, generator=torch.Generator().manual_seed(0)).to(**like) * 2 - 0.5
    with torch.no_grad():
        expected, got = model(probes.clone()), _fresh_values(chain, probes)
    scale = float(torch.nan_to_num(expected.abs(), posinf=0.0).max().clamp(min=1))
    if expected.shape != got.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * scale, equal_nan=True):
        raise BoundError(f'{type(model).__name__}: the traced graph does not compute what its forward computes '
                         '(an in-place operation on a tensor that is used again?); write it without one')


def _fresh_values(layers, x):
    """The chain's output as the pass reads it: every layer applied to a copy of its input (no
    in-place change reaches another branch), a residual block the sum of its branches."""
    for layer in layers:
        if type(layer) is Residual:
            x = sum(_fresh_values(branch, x) for branch in layer.branches)
        else:
            x = layer(x.clone())
    return x


TRAINING_DEPENDENT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.BatchNorm1d, nn.BatchNorm2d)


def _check_eval_mode(model):
    """Refuse Dropout or BatchNorm in training mode (they are fixed maps only in eval mode)."""
    for name, module in model.named_modules():
        if isinstance(module, TRAINING_DEPENDENT) and module.training:
            raise BoundError(f'layer {name or "(the model)"} ({type(module).__name__}) is in training mode: '
                             'call model.eval() before certifying')


def _all_ruled(layers, rules):
    """True when every layer, inside residual blocks too, has a rule as it is and every branch is a
    plain ``nn.Sequential`` (a subclass may have its own forward: it is traced instead)."""
    return all(type(layer) in rules and (type(layer) is not Residual or all(
        type(branch) is nn.Sequential and _all_ruled(branch, rules) for branch in layer.branches))
        for layer in layers)


class _Tracer(fx.Tracer):
    """Keeps the layers the pass has rules for (and torch's own modules) whole."""

    def __init__(self, rules):
        super().__init__()
        self.rules = rules

    def is_leaf_module(self, module, qualified_name):
        """Leaves: layers with rules, torch's own layers, ConvLike maps, and subclasses of these (a
        subclass may compute something else: kept whole, it is refused by name instead of traced)."""
        if type(module) in (nn.Sequential, nn.ModuleList, Residual):
            return False                # traced through: a Residual's sum becomes a rewritten block
        return (type(module) in self.rules or super().is_leaf_module(module, qualified_name)
                or any(isinstance(module, cls) for cls in self.rules) or isinstance(module, ConvLike)
                or _subclasses_torch_layer(module))


def _subclasses_torch_layer(module):
    """True for a subclass of a layer defined in torch.nn (not of nn.Module itself)."""
    return any(cls.__module__.startswith('torch.nn') and cls not in (nn.Module, nn.Sequential, nn.ModuleList)
               for cls in type(module).__mro__[1:])


def _trace(model, rules):
    try:
        graph = _Tracer(rules).trace(model)
    except Exception as error:      # fx raises many types for control flow it cannot follow
        raise BoundError(f'{type(model).__name__} could not be traced by torch.fx (the bound pass needs '
                         f'a static graph): {_first_line(error)}') from None
    return fx.GraphModule(model, graph)


def _shapes(graph, model, input_shape, param):
    """Annotate every node with its output shape (``ShapeProp``, one probe forward in the dtype and
    on the device of ``param``, one of the model's parameters or None)."""
    probe = torch.zeros(1, *input_shape, dtype=param.dtype if param is not None else torch.float32,
                        device=param.device if param is not None else 'cpu')
    try:
        with torch.no_grad():
            ShapeProp(graph).propagate(probe)
    except Exception as error:
        raise BoundError(f'an input of shape {tuple(input_shape)} does not fit {type(model).__name__}: '
                         f'{_first_line(error)}') from None


def _first_line(error):
    text = str(error).strip().splitlines()
    return f'{type(error).__name__}: {text[0] if text else ""}'


def _rewrite(graph, rules):
    """The layers from the input to the output of ``graph``, one list per node (a node's layers are
    its input's plus at most one)."""
    layers, inputs = {}, [n for n in graph.graph.nodes if n.op == 'placeholder']
    if len(inputs) != 1:
        raise BoundError(f'the model takes {len(inputs)} inputs; the bound pass takes one image tensor')
    for node in graph.graph.nodes:
        if node.op == 'placeholder':
            layers[node] = []
        elif node.op == 'output':
            result = node.args[0]
            if not isinstance(result, fx.Node) or result not in layers:
                raise BoundError('the model must return one tensor of logits')
            return layers[result]
        elif node.op == 'call_method' and node.target == 'size':
            layers[node] = None             # read only by the view/reshape pattern
        else:
            layers[node] = _step(node, graph, layers, rules)
    raise BoundError('the traced model has no output')


def _step(node, graph, layers, rules):
    """The layers of ``node``: those of its input with this node's layer appended."""
    where = f"node '{node.name}'"
    if node.op == 'call_module':
        module = graph.get_submodule(node.target)
        where = f'layer {node.target}'
        return _module_step(module, _input(node, layers, where), node, where, rules)
    if node.op in ('call_function', 'call_method'):
        return _function_step(node, layers, where)
    raise BoundError(f'{where} ({node.op} {node.target}): not supported by the bound pass')


def _input(node, layers, where):
    tensors = node.all_input_nodes
    if len(tensors) != 1 or layers.get(tensors[0]) is None:
        raise BoundError(f'{where} ({_target_name(node)}): takes {len(tensors)} tensors; the bound pass follows '
                         'one chain (sums of two branches aside)')
    return layers[tensors[0]]


def _module_step(module, before, node, where, rules):
    name = f'{where} ({type(module).__name__})'
    if type(module) in (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d):
        return before                   # exact types: a subclass may compute something else
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return _batch_norm_step(module, before, name)
    if type(module) in (nn.AvgPool2d, nn.AdaptiveAvgPool2d):
        return before + [_pool(module, node, name)]
    if type(module) in rules:
        return before + [module]
    raise BoundError(f'{name}: no bound rule for this layer type (see README, "Your own network")')


def _batch_norm_step(bn, before, name):
    if not bn.track_running_stats or bn.running_var is None:
        raise BoundError(f'{name} has no running statistics (track_running_stats=False uses batch '
                         'statistics even in eval mode): not a fixed map')
    last = before[-1] if before else None
    if type(last) is nn.Conv2d:
        return before[:-1] + [FoldedConv(last, bn)]
    if type(last) is nn.Linear:
        return before[:-1] + [FoldedLinear(last, bn)]
    if isinstance(bn, nn.BatchNorm2d):
        return before + [ChannelScale(bn)]
    raise BoundError(f'{name}: a BatchNorm1d must follow a Linear layer')


def _pool(module, node, name):
    """A ``PoolConv`` of the pooling ``module`` (its input's shape from the shape propagation)."""
    channels, height, width = _input_shape(node).shape[1:]
    if isinstance(module, nn.AdaptiveAvgPool2d):
        out = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * 2
        out = tuple(size if o is None else o for o, size in zip(out, (height, width)))
        if height % out[0] or width % out[1]:
            raise BoundError(f'{name}: output {out} does not divide the input {height}x{width} into equal windows')
        kernel = (height // out[0], width // out[1])
        return PoolConv(channels, kernel, kernel, (0, 0)).to(_input_shape(node).dtype)
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    if module.ceil_mode or not module.count_include_pad or module.divisor_override is not None:
        raise BoundError(f'{name}: only ceil_mode=False, count_include_pad=True, no divisor_override')
    return PoolConv(channels, pair(module.kernel_size), pair(module.stride or module.kernel_size),
                    pair(module.padding)).to(_input_shape(node).dtype)


def _input_shape(node):
    """The shape propagation's record (shape, dtype) of ``node``'s tensor input."""
    source = next(a for a in node.args if isinstance(a, fx.Node))
    return source.meta['tensor_meta']


RELUS = {F.relu, torch.relu, 'relu'}
ADDS = {operator.add, torch.add, 'add'}
FLATTENS = {torch.flatten, 'flatten'}
RESHAPES = {'view', 'reshape', torch.reshape}
COPIES = {'clone', torch.clone, 'contiguous'}      # the same values: the pass reads fresh values anyway


def _function_step(node, layers, where):
    name = f'{where} ({_target_name(node)})'
    if node.target in ADDS:
        return _residual_step(node, layers, name)
    if node.target in RESHAPES and _keeps_batch_flattens(node) and layers.get(node.args[0]) is not None:
        return layers[node.args[0]] + [Flatten()]
    before = _input(node, layers, where)
    if node.target in COPIES:
        return before
    if node.target in RELUS and not node.kwargs.get('inplace', False):
        return before + [nn.ReLU()]
    if node.target in FLATTENS and _flattens_from_one(node):
        return before + [Flatten()]
    raise BoundError(_unsupported(node, name))


def _unsupported(node, name):
    """The refusal of a function ``node``, naming the innermost module whose forward called it."""
    stack = node.meta.get('nn_module_stack') or {}
    if stack:
        path, cls = list(stack.values())[-1]
        return (f'layer {path} ({cls.__name__}): no bound rule for this layer type (its forward calls '
                f'{name.split(" ", 2)[-1].strip("()")}, which the pass does not model; an activation is '
                'declared with local_bound.register_activation: README, "Extending")')
    return f'{name}: not supported by the bound pass (see README, "Your own network")'


def _target_name(node):
    return getattr(node.target, '__name__', str(node.target))


def _flattens_from_one(node):
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get('start_dim', 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get('end_dim', -1)
    return start == 1 and end == -1


def _keeps_batch_flattens(node):
    """``x.view(x.size(0), -1)`` (or reshape): the batch size read from the same tensor, then -1."""
    sizes = node.args[1:] if len(node.args) > 2 else tuple(node.args[1]) if len(node.args) == 2 else ()
    if len(sizes) != 2 or sizes[1] != -1:
        return False
    batch = sizes[0]
    return (isinstance(batch, fx.Node) and batch.op == 'call_method' and batch.target == 'size'
            and batch.args[0] is node.args[0] and tuple(batch.args[1:]) == (0,))


def _residual_step(node, layers, name):
    """The sum of two tensors of the chain: ``x + conv(x)`` with a size-keeping Conv2d is one
    ``LinearResidual``; any other ``a(x) + b(x)`` a ``Residual`` of the two branches after their
    common layers (an empty branch is the identity)."""
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if len(tensors) != 2 or node.kwargs.get('alpha', 1) != 1 or any(layers.get(t) is None for t in tensors):
        raise BoundError(f'{name}: only the sum of two tensors of the chain is supported')
    first, second = (layers[t] for t in tensors)
    common = 0
    while common < min(len(first), len(second)) and first[common] is second[common]:
        common += 1
    short, long_ = sorted((first[common:], second[common:]), key=len)
    if not short and len(long_) == 1 and not same_size_problem(long_[0]):
        return first[:common] + [LinearResidual(long_[0])]
    return first[:common] + [Residual(nn.Sequential(*long_), shortcut=nn.Sequential(*short))]
