"""Helpers the tests share, in one place:

* independent references (explicit matrices, SVD norms, the exact last-layer translation, the
  ball/box pass of docs/method.md §2 in ``reference_pass``), small float64 networks of every
  activation, and points of the L2 ball (random, on the sphere, attacked); these call the code
  under test only to build models (``models``) and run them forward;
* shortcuts to the code under test that several test files use (``propagate_records``,
  ``twin_stores``);
* the real MNIST digits of ../shared/data (``MNIST_MINI``, ``HAVE_MNIST``) and the marks of the
  tests that read them (``needs_mnist``); the marks of the tests that start several processes
  (``multi_process``) and ``launch``, which runs a script in one process or several (torchrun);
* ``fake_mnist``: a small synthetic MNIST folder in torchvision's raw layout.

conftest.py registers this module for pytest's assertion rewriting.
"""
import math
import os
import re
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import local_bound as lb
import models
from models import ClampGroupSort, Flatten, ReLU_x
from settings import AUTHORS

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data'
MNIST_MINI = SHARED_DATA / 'mnist-mini'
HAVE_MNIST = (MNIST_MINI / 'MNIST' / 'raw').is_dir()


class Marks(tuple):
    """Marks that go together: ``@marks`` on a test (or a class) applies them all; a module whose
    tests all need them writes ``pytestmark = [*marks, ...]``."""

    def __call__(self, test):
        for mark in self:
            test = mark(test)
        return test


# Tests that read the real digits: marked `data` (pytest -m "not data" deselects them), skipped
# when ../shared/data/mnist-mini is absent.
needs_mnist = Marks((pytest.mark.data,
                     pytest.mark.skipif(not HAVE_MNIST, reason=f'real MNIST digits not found at {MNIST_MINI}')))
# Tests that start several processes (torchrun, gloo on CPU): `distributed`, and `slow` (they train).
multi_process = Marks((pytest.mark.distributed, pytest.mark.slow))


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


# ----------------------------------------------------------------------------- references of the bound pass

def exact_translation(w, lower, upper, radius, iters=200):
    """Exact ``max <w, d>`` s.t. ``|d|_2 <= radius``, ``lower <= d <= upper`` (lower <= 0 <= upper).

    KKT: ``d = clip(lam * w, lower, upper)`` with the smallest lam >= 0 making ``|d| = radius``; if the
    box corner in the direction of w already fits in the ball, it is the optimum.
    """
    w, lower, upper = (np.asarray(a, dtype=np.float64) for a in (w, lower, upper))
    corner = np.where(w > 0, upper, np.where(w < 0, lower, 0.0))
    if np.linalg.norm(corner) <= radius:
        return float(w @ corner)
    lo, hi = 0.0, 1.0
    while np.linalg.norm(np.clip(hi * w, lower, upper)) < radius:
        hi *= 2.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if np.linalg.norm(np.clip(mid * w, lower, upper)) < radius:
            lo = mid
        else:
            hi = mid
    return float(w @ np.clip(hi * w, lower, upper))


def filter_row_norms(layer, out_shape):
    """Per-output-neuron L2 norm of the layer's row (docs/method.md §2: a conv uses the whole filter's norm)."""
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        return w.norm(dim=1)
    return w.flatten(1).norm(dim=1).view(-1, 1, 1).expand(*out_shape)


def reference_pass(model, x, eps):
    """docs/method.md §2, written independently, with exact (SVD) global norms. Per sample b returns a dict:

    centre, lower, upper (penultimate), boxes (lower, upper after every layer but the last),
    masks {activation index: 0/1 varying mask}, affine [(index, matrix, in_mask, out_mask)],
    global_sigma {index: exact ||W||}, local_product (product of exact masked norms).
    """
    layers = list(model)
    results = []
    with torch.no_grad():
        for b in range(x.size(0)):
            m = x[b:b + 1]
            lower, upper, r = m - eps, m + eps, float(eps)
            mask, boxes, masks, affine, sigmas = None, [], {}, [], {}
            for idx, layer in enumerate(layers[:-1]):
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    in_shape = tuple(m.shape[1:])
                    mat = explicit_matrix(layer, in_shape)
                    out = layer(m)
                    out_shape = tuple(out.shape[1:])
                    mid = layer((lower + upper) / 2)
                    rad = (mat.abs() @ ((upper - lower) / 2).reshape(-1)).view(1, *out_shape)
                    ball = r * filter_row_norms(layer, out_shape).unsqueeze(0)
                    lower = torch.maximum(mid - rad, out - ball)
                    upper = torch.minimum(mid + rad, out + ball)
                    sigma = top_singular(mat)
                    sigmas[idx] = sigma
                    affine.append([idx, mat, mask, None])
                    m, r = out, r * sigma
                elif isinstance(layer, (ReLU_x, nn.ReLU)):
                    if isinstance(layer, ReLU_x):
                        theta = layer.threshold.detach()
                        act = lambda t, th=theta: torch.clamp(torch.minimum(t, th), min=0.0)  # noqa: E731
                        mask = ((lower <= theta) & (upper > 0)).to(x.dtype)
                    else:
                        act = torch.relu
                        mask = (upper > 0).to(x.dtype)
                    affine[-1][3] = mask
                    lower = torch.maximum(act(lower), act(m - r))
                    upper = torch.minimum(act(upper), act(m + r))
                    m = act(m)
                    masks[idx] = mask
                elif isinstance(layer, ClampGroupSort):
                    hi_t, lo_t = layer.max.detach(), layer.min.detach()

                    def act(t, hi_t=hi_t, lo_t=lo_t):
                        a, c = t.chunk(2, dim=1)
                        return torch.cat([torch.minimum(torch.maximum(a, c), hi_t),
                                          torch.maximum(torch.minimum(a, c), lo_t)], dim=1)
                    lower = torch.maximum(act(lower), act(m - r))
                    upper = torch.minimum(act(upper), act(m + r))
                    m = act(m)
                    high_lower = lower.chunk(2, dim=1)[0]
                    low_upper = upper.chunk(2, dim=1)[1]
                    mask = torch.cat([(high_lower < hi_t), (low_upper > lo_t)], dim=1).to(x.dtype)
                    masks[idx] = mask
                elif isinstance(layer, (Flatten, nn.Flatten)):
                    m, lower, upper = m.reshape(1, -1), lower.reshape(1, -1), upper.reshape(1, -1)
                    mask = None if mask is None else mask.reshape(1, -1)
                else:
                    raise TypeError(type(layer))
                boxes.append((lower, upper))
            product = 1.0
            for idx, mat, in_mask, out_mask in affine:
                product *= top_singular(masked_matrix(mat, in_mask, out_mask))
            results.append(dict(centre=m, lower=lower, upper=upper, boxes=boxes, masks=masks,
                                affine=affine, global_sigma=sigmas, local_product=product))
    return results


def maxmin_relu_trap():
    """Linear -> clipped MaxMin -> ReLU -> Linear, two inputs and eps 0.5: (model, x, y, eps).

    The first Linear's unit ``b = x_0 - 0.5`` varies and wins the max against ``a = -1``, while the
    ReLU after the min half is dead: a ReLU mask written by position onto the first Linear's rows
    (the MaxMin -> ReLU bug of issue 22) drops ``b``'s row, and the pass certifies x = (0.2, 0),
    which the point (0.7, 0) of the ball flips (z_1 - z_0 = 1 there). x = (0, 0) is robust: b stays
    <= 0, so the ReLU keeps the max half at 0.
    """
    first, last = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
        first.bias.copy_(torch.tensor([-1.0, -0.5]))
        last.weight.copy_(torch.tensor([[-10.0, 0.0], [0.0, 0.0]]))
        last.bias.copy_(torch.tensor([1.0, 0.0]))
    model = nn.Sequential(first, ClampGroupSort([1, 1], 10.0, -5.0), nn.ReLU(), last)
    return model, torch.tensor([[0.2, 0.0], [0.0, 0.0]]), torch.tensor([0, 0]), 0.5


def affine_layers(model, input_shape):
    """[(layer, input shape)] of every conv/linear layer but the last (computed with the plain forward)."""
    out, x = [], torch.zeros(1, *input_shape, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        for layer in list(model)[:-1]:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                out.append((layer, tuple(x.shape[1:])))
            x = layer(x)
    return out


# ----------------------------------------------------------------------------- shortcuts to the code under test

def twin_stores(model, input_shape, n):
    """Two stores with identical start vectors, so two bound passes start from the same vectors."""
    stores = [lb.SingularVectorStore(model, input_shape, n, seed=123) for _ in range(2)]
    for i in stores[0].vectors:
        assert torch.equal(stores[0].vectors[i], stores[1].vectors[i])
    return stores


def propagate_records(model, x, eps, sniter=3000):
    return lb.propagate(model, x, eps, AUTHORS.replace(sniter=sniter)).records


# ----------------------------------------------------------------------------- a synthetic MNIST folder

def write_idx(path, array):
    """An uncompressed IDX file (MNIST's format) holding the uint8 ``array``."""
    path.write_bytes(struct.pack('>I', 0x800 + array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape)
                     + array.astype(np.uint8).tobytes())


def fake_mnist(root, train=32, test=41, seed=0):
    """MNIST in torchvision's raw layout: noisy 28x28 images whose label is where a bright patch is."""
    rng = np.random.default_rng(seed)
    raw = root / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    for split, count in (('train', train), ('t10k', test)):
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 60, (count, 28, 28))
        for image, label in zip(images, labels):
            row, col = 4 + 12 * (label // 5), 1 + 5 * (label % 5)
            image[row:row + 6, col:col + 5] = 255
        write_idx(raw / f'{split}-images-idx3-ubyte', images)
        write_idx(raw / f'{split}-labels-idx1-ubyte', labels)
    return root


# ----------------------------------------------------------------------------- scripts in several processes

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
TIMEOUT = 600

# Runs a script as __main__ after recording, for this rank, every file opened for writing (or
# renamed, or created as a folder) under WATCHED and, at exit, the parameters of the model the
# script trained (the one handed to the optimiser). The Python code in $LAUNCH_PRELUDE (launch's
# ``prelude``) runs first, in every process: a test's patch of the code under test.
LAUNCHER = textwrap.dedent('''
    import atexit, os, runpy, sys
    import torch
    audit, watched, script, *argv = sys.argv[1:]
    rank = os.environ.get('RANK', '0')
    writes, models = [], []

    def hook(event, args):
        if event in ('open', 'os.rename', 'os.mkdir') and isinstance(args[0], str):
            paths = args[:2] if event == 'os.rename' else args[:1]
            writing = event != 'open' or args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND)
            writes.extend(p for p in map(os.path.abspath, paths) if writing and p.startswith(watched + os.sep))

    def report():
        with open(os.path.join(audit, f'writes_rank{rank}.txt'), 'w') as f:
            f.write('\\n'.join(writes))
        if models:
            torch.save(models[0].state_dict(), os.path.join(audit, f'params_rank{rank}.pt'))

    exec(os.environ.get('LAUNCH_PRELUDE', ''))
    import utils
    make_optimizer = utils.make_optimizer
    utils.make_optimizer = lambda args, model: models.append(model) or make_optimizer(args, model)
    atexit.register(report)
    sys.addaudithook(hook)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name='__main__')
''')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch(tmp, name, script, args, nproc=1, prelude=''):
    """Run ``script`` with ``args`` in ``tmp/name`` (1 process, or ``nproc`` under torchrun), after
    the Python code ``prelude`` in every process.

    Returns (stdout, run folder, audit folder); fails the test with the output on a non-zero exit.
    """
    run, audit = tmp / name, tmp / f'{name}_audit'
    run.mkdir()
    audit.mkdir()
    launcher = tmp / 'launcher.py'
    launcher.write_text(LAUNCHER)
    command = [str(launcher), str(audit), str(run), str(ROOT / script), *args, '--device', 'cpu']
    if nproc > 1:
        command = ['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
                   f'--master_port={free_port()}', *command]
    result = subprocess.run([sys.executable, *command], cwd=run, env={**ENV, 'LAUNCH_PRELUDE': prelude}, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, run, audit


def store_lines(stdout):
    """{(name, rank): (examples, MiB)} from the start-up lines of every rank."""
    pattern = r'(train|test) singular-vector store on rank (\d+): ([\d,]+) examples, ([\d.]+) MiB'
    return {(name, int(rank)): (int(count.replace(',', '')), float(mib))
            for name, rank, count, mib in re.findall(pattern, stdout)}
