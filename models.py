"""The layers and the model zoo of docs/method.md section 1: ``nn.Sequential`` models whose layer
indices and parameter names match the authors' checkpoints."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import data_load


# ----------------------------------------------------------------------------- layers

class Flatten(nn.Module):
    """Flatten everything but the batch dimension (no parameters)."""

    def forward(self, x):
        return x.reshape(x.size(0), -1)


class ReLU_x(nn.Module):
    """ReLU clipped at a learnable per-neuron threshold: ``clamp(min(x, threshold), min=0)``."""

    def __init__(self, shape, init=1.0):
        super().__init__()
        self.threshold = nn.Parameter(torch.full(tuple(shape), float(init)))

    def forward(self, x):
        return relu_x(x, self.threshold)


class ClampGroupSort(nn.Module):
    """Clipped MaxMin: channel halves (a, b) -> (min(max(a,b), max), max(min(a,b), min))."""

    def __init__(self, half_shape, max_threshold, min_threshold):
        super().__init__()
        self.min = nn.Parameter(torch.full(tuple(half_shape), float(min_threshold)))
        self.max = nn.Parameter(torch.full(tuple(half_shape), float(max_threshold)))

    def forward(self, x):
        return clamp_maxmin(x, self.max, self.min)


class ConvLike(nn.Module):
    """A map the bound pass treats as one Conv2d: subclasses give ``weight`` and ``bias`` (computed
    from their parts, so gradients reach those) and the geometry of ``conv``, the Conv2d they extend."""

    def __getattr__(self, name):
        if name in CONV_GEOMETRY:
            return getattr(self.conv, name)
        return super().__getattr__(name)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def plain(self):
        """An ``nn.Conv2d`` holding a copy of the current weight and bias (same dtype and device)."""
        weight, bias = self.weight.detach(), self.bias
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias.detach())
        return conv


CONV_GEOMETRY = ('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding', 'dilation', 'groups',
                 'padding_mode')


class LinearResidual(ConvLike):
    """LiResNet's linear residual block ``x + conv(x)``: one Conv2d whose kernel is ``conv``'s plus
    the identity at the centre tap (the same function), so its local norm is the masked norm of
    ``I + W``. ``conv`` keeps the size: as many outputs as inputs, stride 1, an odd kernel, padding
    of half the kernel, no groups or dilation, zero padding."""

    def __init__(self, conv):
        super().__init__()
        problem = same_size_problem(conv)
        if problem:
            raise ValueError(f'LinearResidual needs a size-keeping Conv2d: {problem}')
        self.conv = conv

    @property
    def weight(self):
        conv = self.conv
        kh, kw = conv.kernel_size
        eye = torch.zeros_like(conv.weight)
        eye[:, :, kh // 2, kw // 2] = torch.eye(conv.out_channels, dtype=eye.dtype, device=eye.device)
        return conv.weight + eye

    @property
    def bias(self):
        return self.conv.bias

    def forward(self, x):
        return x + self.conv(x)


class Residual(nn.Module):
    """A residual block ``shortcut(x) + f(x)``: ``f`` and ``shortcut`` are ``nn.Sequential`` chains
    (an empty ``shortcut``, the default, is the identity). The bound pass composes it as
    ``||J_shortcut|| + ||J_f||`` with the masks inside each branch (docs/graphs.md)."""

    def __init__(self, f, shortcut=None):
        super().__init__()
        self.f = f if isinstance(f, nn.Sequential) else nn.Sequential(f)
        self.shortcut = nn.Sequential() if shortcut is None else shortcut

    @property
    def branches(self):
        return (self.shortcut, self.f)

    def forward(self, x):
        branch = self.f(x.clone())      # a copy: an in-place layer of f cannot change the shortcut's input
        return self.shortcut(x) + branch


def same_size_problem(conv):
    """Why ``x + conv(x)`` is not one Conv2d of the same geometry ('' when it is)."""
    if type(conv) is not nn.Conv2d:
        return f'{type(conv).__name__} is not an nn.Conv2d'
    kh, kw = conv.kernel_size
    if (conv.in_channels != conv.out_channels or tuple(conv.stride) != (1, 1) or conv.groups != 1
            or tuple(conv.dilation) != (1, 1) or kh % 2 == 0 or kw % 2 == 0
            or tuple(conv.padding) != (kh // 2, kw // 2) or conv.padding_mode != 'zeros'):
        return (f'Conv2d({conv.in_channels}, {conv.out_channels}, kernel {tuple(conv.kernel_size)}, stride '
                f'{tuple(conv.stride)}, padding {conv.padding}, groups {conv.groups}) changes the size or mixes '
                'groups (wanted: same channels, stride 1, odd kernel, padding kernel // 2, groups 1)')
    return ''


def relu_x(x, threshold):
    return torch.clamp(torch.minimum(x, threshold), min=0.0)


def clamp_maxmin(x, max_threshold, min_threshold):
    a, b = x.split(x.size(1) // 2, dim=1)
    high = torch.minimum(torch.maximum(a, b), max_threshold)
    low = torch.maximum(torch.minimum(a, b), min_threshold)
    return torch.cat([high, low], dim=1)


# ----------------------------------------------------------------------------- models

# (in, out, kernel, stride, padding) per conv; docs/method.md §1.
MNIST_4C = [(1, 32, 3, 1, 1), (32, 32, 4, 2, 1), (32, 64, 3, 1, 1), (64, 64, 4, 2, 1)]
CIFAR_4C = [(3, 32, 3, 1, 1), (32, 32, 4, 2, 1), (32, 64, 3, 1, 1), (64, 64, 4, 2, 1)]
CIFAR_6C = [(3, 32, 3, 1, 1), (32, 32, 3, 1, 1), (32, 32, 4, 2, 1),
            (32, 64, 3, 1, 1), (64, 64, 3, 1, 1), (64, 64, 4, 2, 1)]
TINY_8C = [(3, 64, 3, 1, 1), (64, 64, 3, 1, 1), (64, 64, 4, 2, 0), (64, 128, 3, 1, 1),
           (128, 128, 3, 1, 1), (128, 128, 4, 2, 0), (128, 256, 3, 1, 1), (256, 256, 4, 2, 0)]
CIFAR_6C_MAXMIN = [(.1, -.1), (.1, -.15), (.15, -.15), (.15, -.15), (.2, -.2), (.3, -.3), (1.2, -1.2)]
TINY_8C_MAXMIN = [(.8, -.8), (1, -1), (1.4, -1.4), (1.4, -1.4), (1.4, -1.4), (1.6, -1.6), (2, -2),
                  (3, -3), (1.6, -1.6)]


def _conv_out(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def build_sequential(input_shape, convs, linears, activation):
    """Conv/Linear stack where every layer but the last is followed by ``activation(shape, k)``.

    ``activation(shape, k)`` receives the activation's input shape ``[1, C, H, W]`` or ``[1, F]``
    and its rank k among the activations, and returns the module.
    """
    channels, height, width = input_shape
    layers, k = [], 0
    for c_in, c_out, kernel, stride, padding in convs:
        assert c_in == channels, (c_in, channels)
        layers.append(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding))
        height, width = _conv_out(height, kernel, stride, padding), _conv_out(width, kernel, stride, padding)
        channels = c_out
        layers.append(activation([1, channels, height, width], k))
        k += 1
    layers.append(Flatten())
    features = channels * height * width
    for i, out_features in enumerate(linears):
        layers.append(nn.Linear(features, out_features))
        features = out_features
        if i < len(linears) - 1:
            layers.append(activation([1, features], k))
            k += 1
    model = nn.Sequential(*layers)
    init_conv_weights(model)
    return model


def init_conv_weights(model):
    """Conv weights ~ N(0, sqrt(2 / (k*k*out_channels))), conv biases 0; Linear keeps PyTorch's init."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            with torch.no_grad():
                module.weight.normal_(0, math.sqrt(2.0 / fan))
                module.bias.zero_()


def relux_activation(init):
    return lambda shape, k: ReLU_x(shape, init)


def standard_relu(shape, k):
    return nn.ReLU()


def maxmin_activation(thresholds):
    def make(shape, k):
        half = [shape[0], shape[1] // 2, *shape[2:]]
        high, low = thresholds[k]
        return ClampGroupSort(half, high, low)
    return make


def build_liresnet(input_shape, width, blocks, hidden, classes, activation):
    """A small LiResNet: stem Conv2d(3x3) to ``width`` channels, ``blocks`` linear residual blocks
    ``x + conv(x)`` (3x3, ``LinearResidual``), a neck Conv2d(4x4, stride 2), Flatten, Linear to
    ``hidden``, Linear to ``classes``; ``activation(shape, k)`` after every layer but the last."""
    channels, height, width_px = input_shape
    layers = [nn.Conv2d(channels, width, 3, padding=1), activation([1, width, height, width_px], 0)]
    for k in range(blocks):
        layers += [LinearResidual(nn.Conv2d(width, width, 3, padding=1)),
                   activation([1, width, height, width_px], k + 1)]
    height, width_px = _conv_out(height, 4, 2, 1), _conv_out(width_px, 4, 2, 1)
    layers += [nn.Conv2d(width, width, 4, stride=2, padding=1), activation([1, width, height, width_px], blocks + 1),
               Flatten(), nn.Linear(width * height * width_px, hidden), activation([1, hidden], blocks + 2),
               nn.Linear(hidden, classes)]
    model = nn.Sequential(*layers)
    init_conv_weights(model)
    return model


def build_resnet(input_shape, width, blocks, hidden, classes, activation):
    """A small ResNet without BatchNorm: stem Conv2d(3x3), ``blocks`` blocks ``x + conv(act(conv(x)))``
    (``Residual``) each followed by ``activation``, then the neck and head of ``build_liresnet``."""
    channels, height, width_px = input_shape
    shape = [1, width, height, width_px]
    layers = [nn.Conv2d(channels, width, 3, padding=1), activation(shape, 0)]
    for k in range(blocks):
        f = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), activation(shape, 2 * k + 1),
                          nn.Conv2d(width, width, 3, padding=1))
        layers += [Residual(f), activation(shape, 2 * k + 2)]
    height, width_px = _conv_out(height, 4, 2, 1), _conv_out(width_px, 4, 2, 1)
    layers += [nn.Conv2d(width, width, 4, stride=2, padding=1), activation([1, width, height, width_px], 2 * blocks + 1),
               Flatten(), nn.Linear(width * height * width_px, hidden), activation([1, hidden], 2 * blocks + 2),
               nn.Linear(hidden, classes)]
    model = nn.Sequential(*layers)
    init_conv_weights(model)
    return model


def _model_table():
    """(data, name) -> builder(init). The 4C3F ReLU_x models always start at threshold 1.0."""
    mnist, cifar, tiny = (data_load.input_shape(name) for name in ('mnist', 'cifar10', 'tinyimagenet'))
    return {
        ('mnist', 'relux'): lambda init: build_sequential(mnist, MNIST_4C, [512, 512, 10], relux_activation(1.0)),
        ('mnist', 'standrelu'): lambda init: build_sequential(mnist, MNIST_4C, [512, 512, 10], standard_relu),
        ('cifar10', 'relux'): lambda init: build_sequential(cifar, CIFAR_4C, [512, 512, 10], relux_activation(1.0)),
        ('cifar10', 'c6f2_relux'): lambda init: build_sequential(cifar, CIFAR_6C, [512, 10], relux_activation(init)),
        ('cifar10', 'standrelu'): lambda init: build_sequential(cifar, CIFAR_6C, [512, 10], standard_relu),
        ('cifar10', 'c6f2_clmaxmin'): lambda init: build_sequential(
            cifar, CIFAR_6C, [512, 10], maxmin_activation(CIFAR_6C_MAXMIN)),
        ('mnist', 'liresnet'): lambda init: build_liresnet(mnist, 16, 4, 128, 10, standard_relu),
        ('cifar10', 'liresnet'): lambda init: build_liresnet(cifar, 16, 4, 256, 10, standard_relu),
        ('mnist', 'resnet'): lambda init: build_resnet(mnist, 16, 2, 128, 10, standard_relu),
        ('cifar10', 'resnet'): lambda init: build_resnet(cifar, 16, 2, 256, 10, standard_relu),
        ('tinyimagenet', 'tinyimagenet_relux'): lambda init: build_sequential(
            tiny, TINY_8C, [256, 200], relux_activation(init)),
        ('tinyimagenet', 'tiny_clmaxmin'): lambda init: build_sequential(
            tiny, TINY_8C, [256, 200], maxmin_activation(TINY_8C_MAXMIN)),
    }


MODELS = _model_table()


def register_model(data, name, build):
    """Declare model ``name`` for data set ``data``: ``build(init)`` returns the nn.Sequential."""
    MODELS[(data, name)] = build


def model_names(data):
    return sorted(name for d, name in MODELS if d == data)


def select_model(data, name, init=1.0, device='cpu'):
    """Build model ``name`` for data set ``data`` (docs/method.md §1) on ``device``."""
    if (data, name) not in MODELS:
        raise ValueError(f"unknown model '{name}' for data '{data}'; choose one of {model_names(data)}")
    return MODELS[(data, name)](init).to(device)
