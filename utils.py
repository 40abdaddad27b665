"""Models, layers, command-line flags, schedules, the L2 PGD attack and logging helpers."""
import argparse
import json
import logging
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn


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

# (in, out, kernel, stride, padding) per conv; SPEC section 1.
MNIST_4C = [(1, 32, 3, 1, 1), (32, 32, 4, 2, 1), (32, 64, 3, 1, 1), (64, 64, 4, 2, 1)]
CIFAR_4C = [(3, 32, 3, 1, 1), (32, 32, 4, 2, 1), (32, 64, 3, 1, 1), (64, 64, 4, 2, 1)]
CIFAR_6C = [(3, 32, 3, 1, 1), (32, 32, 3, 1, 1), (32, 32, 4, 2, 1),
            (32, 64, 3, 1, 1), (64, 64, 3, 1, 1), (64, 64, 4, 2, 1)]
TINY_8C = [(3, 64, 3, 1, 1), (64, 64, 3, 1, 1), (64, 64, 4, 2, 0), (64, 128, 3, 1, 1),
           (128, 128, 3, 1, 1), (128, 128, 4, 2, 0), (128, 256, 3, 1, 1), (256, 256, 4, 2, 0)]
CIFAR_6C_MAXMIN = [(.1, -.1), (.1, -.15), (.15, -.15), (.15, -.15), (.2, -.2), (.3, -.3), (1.2, -1.2)]
TINY_8C_MAXMIN = [(.8, -.8), (1, -1), (1.4, -1.4), (1.4, -1.4), (1.4, -1.4), (1.6, -1.6), (2, -2),
                  (3, -3), (1.6, -1.6)]

INPUT_SHAPES = {'mnist': (1, 28, 28), 'cifar10': (3, 32, 32), 'tinyimagenet': (3, 64, 64)}
NUM_CLASSES = {'mnist': 10, 'cifar10': 10, 'tinyimagenet': 200}


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
    mnist, cifar, tiny = INPUT_SHAPES['mnist'], INPUT_SHAPES['cifar10'], INPUT_SHAPES['tinyimagenet']
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


def model_names(data):
    return sorted(name for d, name in MODELS if d == data)


def select_model(data, name, init=1.0, device='cpu'):
    """Build model ``name`` for data set ``data`` (SPEC section 1) on ``device``."""
    if (data, name) not in MODELS:
        raise ValueError(f"unknown model '{name}' for data '{data}'; choose one of {model_names(data)}")
    return MODELS[(data, name)](init).to(device)


def model_family(model):
    """'relux', 'standrelu' or 'maxmin', from the activation layers of ``model``."""
    kinds = {type(m) for m in model if isinstance(m, (ReLU_x, nn.ReLU, ClampGroupSort))}
    if kinds == {ReLU_x}:
        return 'relux'
    if kinds == {nn.ReLU}:
        return 'standrelu'
    if kinds == {ClampGroupSort}:
        return 'maxmin'
    raise ValueError(f'model mixes activation types: {kinds}')


def clamp_thresholds(model):
    """Project every ReLU_x threshold onto [0, inf) (done after every optimiser step)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ReLU_x):
                module.threshold.clamp_(min=0.0)


# ----------------------------------------------------------------------------- flags

def argparser(data='cifar10', model='c6f2_relux', batch_size=256, epochs=800, warmup=20, rampup=400,
              epsilon=36 / 255, epsilon_train=0.1551, starting_epsilon=0.0, lr=1e-3, end_lr=5e-6,
              argv=None, extra=None):
    """Parse the authors' flags (SPEC section 5) plus ``--device``, ``--data_dir``, ``--bound``, ``--resume``.

    ``extra(parser)`` may add script-specific flags. Returns the namespace with derived fields.
    """
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('schedule')
    g.add_argument('--epochs', type=int, default=epochs)
    g.add_argument('--warmup', type=int, default=warmup, help='epochs of plain cross-entropy training')
    g.add_argument('--rampup', type=int, default=rampup, help='epochs over which eps and kappa ramp')
    g.add_argument('--epsilon', type=float, default=epsilon, help='L2 radius for evaluation')
    g.add_argument('--epsilon_train', type=float, default=epsilon_train)
    g.add_argument('--starting_epsilon', type=float, default=starting_epsilon)
    g.add_argument('--kappa', type=float, default=0.0)
    g.add_argument('--starting_kappa', type=float, default=1.0)
    g = p.add_argument_group('bound')
    g.add_argument('--bound', choices=['local', 'global'], default='local',
                   help='local: masked (local) Lipschitz bound; global: plain spectral norms (baseline)')
    g.add_argument('--sniter', type=int, default=1, help='power iterations per training step')
    g.add_argument('--opt_iter', type=int, default=1, help='clip-and-rescale iterations per training step')
    g.add_argument('--test_sniter', type=int, default=100)
    g.add_argument('--test_opt_iter', type=int, default=1000)
    g.add_argument('--gloro', action='store_true', help='GloRo loss with an extra "bottom" logit')
    g.add_argument('--spectral', choices=['guaranteed', 'lanczos', 'power'], default='power',
                   help='norms of the test-time bound: guaranteed = upper bounds with failure probability '
                        '--failure_prob (docs/certificates.md); lanczos = Krylov estimate with per-sample '
                        'stopping; power = the authors\' power iteration (--test_sniter rounds); the last two '
                        'are estimates from below, without a guarantee')
    g.add_argument('--translation', choices=['iterative', 'exact'], default='iterative',
                   help='last-layer worst case at test time: iterative = the authors\' clip-and-rescale '
                        '(--test_opt_iter rounds), exact = the exact optimum (sorted breakpoints)')
    g.add_argument('--failure_prob', type=float, default=1e-9,
                   help='with --spectral guaranteed: probability that a certificate rests on a norm that is '
                        'not an upper bound (union over all its norms)')
    g = p.add_argument_group('optimiser')
    g.add_argument('--opt', choices=['adam', 'sgd'], default='adam')
    g.add_argument('--lr', type=float, default=lr)
    g.add_argument('--end_lr', type=float, default=end_lr)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight_decay', type=float, default=0.0)
    g.add_argument('--lr_scheduler', choices=['exp', 'step', 'multistep'], default='exp')
    g.add_argument('--more', type=int, default=25, help='extra epochs at the initial lr before exp decay')
    g.add_argument('--step_size', type=int, default=10)
    g.add_argument('--gamma', type=float, default=0.5)
    g.add_argument('--wd_list', nargs='*', type=int, default=None, help='multistep milestones')
    g = p.add_argument_group('attack')
    g.add_argument('--niter', type=int, default=100, help='PGD steps')
    g.add_argument('--alpha', type=float, default=None, help='PGD step size (default epsilon/4)')
    g.add_argument('--restarts', type=int, default=1, help='PGD random restarts')
    g = p.add_argument_group('model and data')
    g.add_argument('--data', default=data, choices=sorted(INPUT_SHAPES))
    g.add_argument('--model', default=model)
    g.add_argument('--init', type=float, default=1.0, help='initial ReLU_x threshold (c6f2/tiny models)')
    g.add_argument('--data_dir', default='data/')
    g.add_argument('--batch_size', type=int, default=batch_size)
    g.add_argument('--test_batch_size', type=int, default=batch_size)
    g.add_argument('--normalization', action='store_true')
    g.add_argument('--no_augmentation', action='store_true')
    g.add_argument('--drop_last', action='store_true')
    g.add_argument('--no_shuffle', action='store_true')
    g.add_argument('--workers', type=int, default=2, help='DataLoader worker processes')
    g.add_argument('--limit_train', type=int, default=None, help='use only the first N training examples')
    g.add_argument('--limit_test', type=int, default=None, help='use only the first N test examples')
    g = p.add_argument_group('performance')
    g.add_argument('--store_device', choices=['auto', 'cpu', 'cuda'], default='auto',
                   help='where the per-example singular vectors live: auto = the compute device when '
                        'they fit in half its free memory, else pinned host memory')
    g.add_argument('--store_dtype', choices=['auto', 'float32', 'float16', 'bfloat16'], default='auto',
                   help='number format of the per-example singular vectors: auto = float32 (the authors\'); '
                        'float16 halves their memory (the power iteration itself always runs in float32)')
    g.add_argument('--loader', choices=['auto', 'torch', 'device'], default='auto',
                   help='device = MNIST/CIFAR-10 held as one uint8 tensor on the compute device, batched, '
                        'cropped and flipped there; torch = DataLoader with per-image transforms; '
                        'auto = device for mnist/cifar10, torch for tinyimagenet')
    g.add_argument('--amp', action='store_true',
                   help='mixed precision for the plain warm-up epochs (never for certification)')
    g.add_argument('--compile', action='store_true',
                   help='run the elementwise kernels of the bound pass through torch.compile (fused loops, '
                        'same values; the first steps pay a few minutes of compilation; needs a C++ compiler '
                        'on CPU)')
    g.add_argument('--power_grad', choices=['unrolled', 'final'], default='unrolled',
                   help='training gradient of the power iterations: unrolled = through every iteration '
                        '(SPEC); final = iterate without autograd, differentiate <v, D W D u> with u, v '
                        'fixed (same values, same gradient at convergence, much cheaper)')
    g = p.add_argument_group('run')
    g.add_argument('--prefix', default=None, help='files are written to pretrained/<prefix>_<model>_*')
    g.add_argument('--saved_model', default=None, help='checkpoint prefix (loads <saved_model>_best.pth)')
    g.add_argument('--resume', action='store_true', help='continue from <prefix>_checkpoint.pth')
    g.add_argument('--save_store', action='store_true',
                   help='also checkpoint the per-example singular vectors (exact --resume, large files)')
    g.add_argument('--no_save', action='store_true')
    g.add_argument('--seed', type=int, default=2019)
    g.add_argument('--device', default=default_device(), help='cuda when available, else cpu')
    g.add_argument('--verbose', type=int, default=200, help='log every N batches to the train log')
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    finish_args(p, args, end_lr_default=end_lr)
    return args


def finish_args(parser, args, end_lr_default=None):
    """Validate flags and add derived fields; bad values end with ``parser.error`` (one line)."""
    if args.model not in model_names(args.data):
        parser.error(f"--model {args.model} does not exist for --data {args.data}; "
                     f"choose one of {', '.join(model_names(args.data))}")
    for name in ('epochs', 'batch_size', 'test_batch_size', 'sniter', 'opt_iter', 'test_sniter',
                 'test_opt_iter', 'niter', 'restarts', 'step_size'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1')
    for name in ('limit_train', 'limit_test'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1')
    for name in ('warmup', 'rampup', 'more', 'workers'):
        if getattr(args, name) < 0:
            parser.error(f'--{name} must be >= 0')
    if args.rampup < 1:
        parser.error('--rampup must be at least 1')
    if args.warmup + args.rampup >= args.epochs:
        parser.error(f'--warmup + --rampup ({args.warmup + args.rampup}) must be below --epochs ({args.epochs}): '
                     'the best model is kept from the end of the ramp-up on')
    check_numbers(parser, args)
    if args.loader == 'device' and args.data == 'tinyimagenet':
        parser.error('--loader device holds MNIST/CIFAR-10 on the device; TinyImageNet is read from '
                     'image folders (use --loader torch or auto)')
    if args.lr_scheduler == 'multistep' and not args.wd_list:
        parser.error('--lr_scheduler multistep needs --wd_list milestones')
    half = args.epochs // 2
    if args.lr_scheduler == 'exp' and half + args.more < args.epochs and half <= args.more:
        parser.error(f'--lr_scheduler exp: the decay would start at epoch {half + args.more} but '
                     f'--epochs // 2 ({half}) must exceed --more ({args.more}); change --more')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error(f'--device {args.device} requested but CUDA is not available')
    args.augmentation = not args.no_augmentation
    args.shuffle = not args.no_shuffle
    args.save = not args.no_save
    args.alpha = args.epsilon / 4 if args.alpha is None else args.alpha
    args.schedule_length = args.rampup
    base = args.prefix or 'temporary'
    args.prefix = os.path.join('pretrained', f'{base}_{args.model}')
    return args


# (low, high, low inclusive, high inclusive) of every real-valued flag; None = unbounded.
FLOAT_RANGES = {
    'epsilon': (0, 1e4, True, True), 'epsilon_train': (0, 1e4, True, True),
    'starting_epsilon': (0, 1e4, True, True), 'failure_prob': (0, 1, False, False), 'kappa': (0, 1, True, True),
    'starting_kappa': (0, 1, True, True), 'lr': (0, None, False, False), 'end_lr': (0, None, False, False),
    'momentum': (0, 1, True, False), 'weight_decay': (0, None, True, False), 'gamma': (0, None, False, False),
    'alpha': (0, None, False, False), 'init': (0, None, True, False), 'sparse': (0, None, True, False),
    'sp_thres': (0, None, True, False), 'radius_max': (0, None, False, False),
    'radius_tol': (0, None, False, False), 'lip_eps': (0, None, False, False),
}


def _range_text(low, high, low_in, high_in):
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def check_numbers(parser, args):
    """Every real-valued flag finite and in its range (``FLOAT_RANGES``); else one-line exit."""
    for name, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f'--{name} must be a finite number, not {value}')
    for name, (low, high, low_in, high_in) in FLOAT_RANGES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        above = value >= low if low_in else value > low
        below = high is None or (value <= high if high_in else value < high)
        if not (above and below):
            parser.error(f'--{name} must be {_range_text(low, high, low_in, high_in)}, not {value}')
    if getattr(args, 'wd_list', None) and min(args.wd_list) < 0:
        parser.error('--wd_list milestones must be >= 0')


def default_device():
    return 'cuda' if torch.cuda.is_available() else 'cpu'


# ----------------------------------------------------------------------------- schedules

def epoch_schedule(args, epoch):
    """(eps, kappa) at the start of ``epoch``: 0/1 in warm-up, linear ramps, then the final values."""
    if epoch < args.warmup:
        return 0.0, 1.0
    t = epoch - args.warmup
    if t < args.rampup:
        eps = float(np.linspace(args.starting_epsilon, args.epsilon_train, args.rampup)[t])
        kappa = float(np.linspace(args.starting_kappa, args.kappa, args.rampup)[t])
        return eps, kappa
    return args.epsilon_train, args.kappa


def batch_schedule(args, eps_epoch, kappa_epoch, i, n):
    """(eps_i, kappa_i) for batch i of n in a robust epoch (the authors' increment, SPEC section 4)."""
    frac = i / n
    eps = eps_epoch + frac * (args.epsilon - args.starting_epsilon) / args.schedule_length
    kappa = kappa_epoch + frac * (args.kappa - args.starting_kappa) / args.schedule_length
    return eps, kappa


def lr_exp(start_lr, end_lr, epoch, max_epoch, more=25):
    """LambdaLR factor: 1 until ``max_epoch//2 + more``, then exponential decay towards end_lr."""
    if epoch < max_epoch // 2 + more:
        return 1.0
    return (end_lr / start_lr) ** ((epoch - (max_epoch // 2 + more - 1)) / (max_epoch // 2 - more))


def make_optimizer(args, model):
    if args.opt == 'adam':
        return torch.optim.Adam(model.parameters(), lr=args.lr)
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay)


def make_scheduler(args, optimizer):
    """The lr schedule, stepped once per epoch."""
    if args.lr_scheduler == 'exp':
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda=lambda e: lr_exp(args.lr, args.end_lr, e, args.epochs, args.more))
    if args.lr_scheduler == 'step':
        start = args.warmup + args.rampup
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda=lambda e: args.gamma ** (max(e - start + 1, 0) // args.step_size))
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.wd_list, gamma=args.gamma)


# ----------------------------------------------------------------------------- logging

class AverageMeter:
    """Running sum/count/average of a scalar."""

    def __init__(self):
        self.sum, self.count = 0.0, 0

    def update(self, value, n=1):
        self.sum += float(value) * n
        self.count += n

    @property
    def avg(self):
        return self.sum / max(self.count, 1)


def get_logger(path=None, quiet=False):
    """Epoch lines to stdout (unless quiet); with ``path``, those and per-batch lines appended there."""
    logger = logging.getLogger('locallip')
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    fmt = logging.Formatter('%(asctime)s %(message)s', datefmt='%H:%M:%S')
    if not quiet:
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(fmt)
        stream.setLevel(logging.INFO)
        logger.addHandler(stream)
    if path is not None:
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def dump_args(args, path):
    with open(path, 'w') as f:
        json.dump(vars(args), f, indent=2, sort_keys=True)
