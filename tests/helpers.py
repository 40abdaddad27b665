"""Helpers the tests share: independent references (explicit matrices, SVD norms), small float64
networks of every activation, and points of the L2 ball (random, on the sphere, attacked).

Nothing here calls the code under test except to build models (``models``) and run them forward."""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from models import ClampGroupSort, Flatten, ReLU_x

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data'
MNIST_MINI = SHARED_DATA / 'mnist-mini'
HAVE_MNIST = (MNIST_MINI / 'MNIST' / 'raw').is_dir()


def explicit_matrix(layer, in_shape):
    """The bias-free layer as a dense matrix [out_dim, in_dim], column by column (basis vectors)."""
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            return layer.weight.detach().clone()
        n = math.prod(in_shape)
        basis = torch.eye(n, dtype=layer.weight.dtype).view(n, *in_shape)
        out = F.conv2d(basis, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return out.reshape(n, -1).T.contiguous()


def top_singular(matrix):
    return float(torch.linalg.svdvals(matrix)[0])


def masked_matrix(matrix, in_mask=None, out_mask=None):
    m = matrix
    if in_mask is not None:
        m = m * in_mask.reshape(1, -1).to(m.dtype)
    if out_mask is not None:
        m = m * out_mask.reshape(-1, 1).to(m.dtype)
    return m


def _seed(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


def random_thresholds(model, low=0.2, high=1.0):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ReLU_x):
                module.threshold.uniform_(low, high)
    return model


def small_conv_net(kind, seed=0, dtype=DT, input_shape=(2, 7, 7)):
    """Conv(2,4,3,1,1) act Conv(4,4,4,2,1) act Flatten Linear(36,12) act Linear(12,4), on 2x7x7.

    The odd input size makes the strided conv need output_padding in its adjoint.
    """
    _seed(seed)
    c, h, w = input_shape
    h2, w2 = (h + 2 - 4) // 2 + 1, (w + 2 - 4) // 2 + 1

    def act(shape, k):
        if kind == 'relux':
            return ReLU_x(shape, 1.0)
        if kind == 'relu':
            return nn.ReLU()
        half = [shape[0], shape[1] // 2, *shape[2:]]
        return ClampGroupSort(half, *models.CIFAR_6C_MAXMIN[k])     # (.1,-.1) (.1,-.15) (.15,-.15)

    model = nn.Sequential(
        nn.Conv2d(c, 4, 3, 1, 1), act([1, 4, h, w], 0),
        nn.Conv2d(4, 4, 4, 2, 1), act([1, 4, h2, w2], 1),
        Flatten(), nn.Linear(4 * h2 * w2, 12), act([1, 12], 2),
        nn.Linear(12, 4))
    models.init_conv_weights(model)
    random_thresholds(model)
    return model.to(dtype)


def small_mlp(kind, seed=0, dtype=DT, sizes=(10, 16, 12, 3)):
    _seed(seed)
    layers = [Flatten()]
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            n = sizes[i + 1]
            if kind == 'relux':
                layers.append(ReLU_x([1, n], 1.0))
            elif kind == 'relu':
                layers.append(nn.ReLU())
            else:
                layers.append(ClampGroupSort([1, n // 2], 0.3, -0.3))
    model = nn.Sequential(*layers)
    random_thresholds(model)
    return model.to(dtype)


def sample_ball(x, eps, n, generator, sphere_fraction=0.3):
    """n points per input in the closed L2 ball (a fraction exactly on the sphere): [B, n, *shape]."""
    b, d = x.size(0), x[0].numel()
    direction = torch.randn(b, n, d, generator=generator, dtype=x.dtype)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    radius = torch.rand(b, n, 1, generator=generator, dtype=x.dtype) ** (1.0 / d)
    radius[:, : int(sphere_fraction * n)] = 1.0
    return x.unsqueeze(1) + (eps * radius * direction).view(b, n, *x.shape[1:])


def layer_outputs(model, z):
    """Outputs of every layer but the last for a batch z (plain PyTorch forward)."""
    outs = []
    with torch.no_grad():
        for layer in list(model)[:-1]:
            z = layer(z)
            outs.append(z)
    return outs


def attack_margin(model, x, y, j, eps, gen, steps=40, starts=4):
    delta = sample_ball(x[None], eps, starts, gen)[0] - x
    best = -float('inf')
    for _ in range(steps):
        delta.requires_grad_(True)
        z = model(x + delta)
        margin = z[:, j] - z[:, y]
        best = max(best, float(margin.detach().max()))
        grad, = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
            delta = delta + eps / 8 * g
            norm = delta.flatten(1).norm(dim=1).view(-1, *([1] * (delta.dim() - 1)))
            delta = delta * torch.clamp(eps / norm.clamp_min(1e-12), max=1.0)
    with torch.no_grad():
        z = model(x + delta)
        best = max(best, float((z[:, j] - z[:, y]).max()))
    return best


def per_neuron_attack_points(model, x, eps, k, gen, steps=25, starts=2):
    """For every neuron of layer k's output, PGD in the ball towards its max and its min: [n_points, *shape]."""
    layers = list(model)[:-1]
    with torch.no_grad():
        width = layer_outputs(model, x[None])[k][0].numel()
    target = torch.arange(width).repeat(starts)
    found = []
    for sign in (1.0, -1.0):
        delta = sample_ball(x[None], eps, len(target), gen)[0] - x
        for _ in range(steps):
            delta.requires_grad_(True)
            z = x + delta
            for layer in layers[:k + 1]:
                z = layer(z)
            value = sign * z.flatten(1).gather(1, target[:, None]).sum()
            grad, = torch.autograd.grad(value, delta)
            with torch.no_grad():
                flat = grad.flatten(1)
                step = (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)).view_as(delta)
                delta = delta + eps / 5 * step
                norm = delta.flatten(1).norm(dim=1).view(-1, *([1] * (delta.dim() - 1)))
                delta = delta * torch.clamp(eps / norm.clamp_min(1e-30), max=1.0)
            found.append(x + delta.detach())
    return torch.cat(found)
