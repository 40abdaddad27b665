"""The layers and the model zoo of docs/method.md section 1: ``nn.Sequential`` models whose layer
indices and parameter names match the authors' checkpoints."""
import math

import torch
import torch.nn as nn

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
