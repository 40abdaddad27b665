"""Command-line flags (with their checks), the eps/kappa/lr schedules and logging.

The models and layers live in ``models.py``; the names scripts reach through ``utils`` are
re-exported here."""
import argparse
import copy
import json
import logging
import math
import os
import sys

import numpy as np
import torch

import data_load
import settings
from models import MODELS, ClampGroupSort, Flatten, ReLU_x, model_names, select_model  # noqa: F401  (re-exported)


class UsageError(RuntimeError):
    """A combination of flags this run cannot honour (one-line message)."""


# Exit statuses of every script: 2 a user error (bad flag, missing data or checkpoint, a model the
# bound pass cannot handle), 1 a failed audit or broken certificate, 3 a diverged training run.
EXIT_USER_ERROR, EXIT_AUDIT_FAILED, EXIT_DIVERGED = 2, 1, 3


def exit_user_error(error):
    """End the script with one line on stderr and exit status 2."""
    print(f'error: {error}', file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


# ----------------------------------------------------------------------------- flags

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` gives every option its default ("(default: X)", also for options without a help
    text), or "(required)"; choices show in the option's metavar ({a,b}). An option whose default
    is None says in its own help what leaving it out means; switches (store_true) show none."""

    def _format_action(self, action):
        if action.help is None and action.option_strings:
            action = copy.copy(action)
            action.help = '(required)' if action.required else '(default: %(default)s)'
        return super()._format_action(action)

    def _get_help_string(self, action):
        if action.required and '(required)' not in action.help:
            return f'{action.help} (required)'
        if action.default is None or (action.nargs == 0 and action.default is False):
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (``prog: error: ...; see prog --help``,
    exit status 2) instead of the usage block, and whose --help shows every default
    (``HelpFormatter``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('formatter_class', HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def _model_help(datasets):
    """The architectures of each data set, for ``--model``'s help."""
    return 'architecture; ' + '; '.join(f"{d}: {', '.join(model_names(d))}" for d in datasets)


def argparser(data='cifar10', model='c6f2_relux', batch_size=256, epochs=800, warmup=20, rampup=400,
              epsilon=36 / 255, epsilon_train=0.1551, starting_epsilon=0.0, lr=1e-3, end_lr=5e-6,
              argv=None, extra=None, training=True):
    """Parse the authors' flags (docs/method.md §5) plus ``--device``, ``--data_dir``, ``--bound``, ``--resume``.

    ``training=False`` (evaluation scripts) leaves out the flags only training reads (schedule,
    optimiser, stores, checkpoints of the run) and adds ``--saved_model``. ``extra(parser)`` may add
    script-specific flags. Returns the namespace with derived fields.
    """
    p = OneLineParser()
    g = p.add_argument_group('schedule' if training else 'radius')
    g.add_argument('--epsilon', type=float, default=epsilon,
                   help='L2 radius of the certificates reported' + (' at the end' if training else ''))
    if training:
        g.add_argument('--epochs', type=int, default=epochs, help='training epochs')
        g.add_argument('--warmup', type=int, default=warmup, help='epochs of plain cross-entropy training')
        g.add_argument('--rampup', type=int, default=rampup, help='epochs over which eps and kappa ramp')
        g.add_argument('--epsilon_train', type=float, default=epsilon_train, help='L2 radius trained at after the ramp-up')
        g.add_argument('--starting_epsilon', type=float, default=starting_epsilon,
                       help='L2 radius trained at when the ramp-up starts')
        g.add_argument('--kappa', type=float, default=0.0, help='weight of the clean loss after the ramp-up')
        g.add_argument('--starting_kappa', type=float, default=1.0,
                       help='weight of the clean loss when the ramp-up starts')
    g = p.add_argument_group('bound')
    g.add_argument('--bound', choices=['local', 'refined', 'global'], default='local',
                   help='local: the paper\'s masked (local) Lipschitz bound; refined: local with masked row '
                        'norms and a ball that follows the local product (docs/method.md §7); global: plain '
                        'spectral norms (baseline)')
    if training:
        g.add_argument('--sniter', type=int, default=1, help='power iterations per training step')
        g.add_argument('--opt_iter', type=int, default=1, help='clip-and-rescale iterations per training step')
    g.add_argument('--test_sniter', type=int, default=100,
                   help='at test time: power iterations per norm (--spectral power), or at most this many '
                        'Lanczos steps per norm (guaranteed, lanczos)')
    g.add_argument('--test_opt_iter', type=int, default=1000,
                   help='clip-and-rescale iterations of the last layer at test time (--translation iterative)')
    g.add_argument('--gloro', action='store_true', help='GloRo loss with an extra "bottom" logit')
    g.add_argument('--spectral', choices=['guaranteed', 'lanczos', 'power'], default='power',
                   help='norms of the test-time bound: guaranteed = upper bounds with failure probability '
                        '--failure_prob (docs/certificates.md); lanczos = Krylov estimate with per-sample '
                        'stopping; power = the authors\' power iteration (--test_sniter rounds); the last two '
                        'are estimates from below, without a guarantee')
    g.add_argument('--translation', choices=['iterative', 'exact'], default=None,
                   help='last-layer worst case at test time: iterative = the authors\' clip-and-rescale '
                        '(--test_opt_iter rounds, an estimate), exact = the exact optimum (sorted breakpoints); '
                        'default: exact with --spectral guaranteed (which requires it), else iterative')
    g.add_argument('--failure_prob', type=float, default=1e-9,
                   help='with --spectral guaranteed: probability that a certificate rests on a norm that is '
                        'not an upper bound (union over all its norms)')
    if training:
        _optimiser_flags(p.add_argument_group('optimiser'), lr, end_lr)
    g = p.add_argument_group('attack')
    g.add_argument('--niter', type=int, default=100, help='PGD steps')
    g.add_argument('--alpha', type=float, default=None, help='PGD step size (default: --epsilon / 4)')
    g.add_argument('--restarts', type=int, default=1, help='PGD random restarts')
    g = p.add_argument_group('model and data')
    # a training script trains on its own data set; evaluation takes any that has a model
    datasets = [data] if training else sorted({name for name, _ in MODELS})
    g.add_argument('--data', default=data, choices=datasets, help='data set')
    g.add_argument('--model', default=model, help=_model_help(datasets))
    g.add_argument('--init', type=float, default=1.0, help='initial ReLU_x threshold (c6f2/tiny models)')
    g.add_argument('--data_dir', default='data/',
                   help='where the data sets are (downloaded there when absent and the network allows)')
    g.add_argument('--test_batch_size', type=int, default=batch_size, help='test batch size')
    g.add_argument('--normalization', action='store_true', help="normalise inputs by the data set's mean and std")
    g.add_argument('--workers', type=int, default=2, help='DataLoader worker processes')
    g.add_argument('--limit_test', type=int, default=None,
                   help='use only the first N test examples (default: all)')
    if training:
        g.add_argument('--batch_size', type=int, default=batch_size, help='training batch size (per process)')
        g.add_argument('--no_augmentation', action='store_true', help='train without random crops and flips')
        g.add_argument('--drop_last', action='store_true', help='drop the last incomplete training batch')
        g.add_argument('--no_shuffle', action='store_true', help='visit the training examples in order')
        g.add_argument('--limit_train', type=int, default=None,
                       help='use only the first N training examples (default: all)')
        _performance_flags(p.add_argument_group('performance'))
    g = p.add_argument_group('run')
    if training:
        g.add_argument('--prefix', default='temporary', help='files are written to pretrained/<prefix>_<model>_*')
        g.add_argument('--resume', action='store_true', help='continue from <prefix>_checkpoint.pth')
        g.add_argument('--save_store', nargs='?', const='always', default='auto', choices=['auto', 'always', 'never'],
                       help='keep the per-example singular vectors with every checkpoint (<prefix>_store.pth), so '
                            'that --resume repeats the uninterrupted run: auto = in one process and up to 2 GiB; '
                            'otherwise --resume re-warms them with passes over the data before training continues '
                            '(a bare --save_store means always)')
        g.add_argument('--no_save', action='store_true', help='write no file (log, checkpoints, best model)')
        g.add_argument('--verbose', type=int, default=200, help='log every N batches to the train log')
        g.add_argument('--tightness', type=int, default=0,
                       help='every robust epoch, the local (or refined) / global bound of the first N test '
                            'examples from converged values (Lanczos estimates over the float64 converged '
                            'global product): the metrics CSV\'s lip_ratio_median; 0 skips it')
    else:
        g.add_argument('--saved_model', default=None,
                       help='required: the checkpoint prefix (loads <saved_model>_best.pth; a .pth path works too)')
    g.add_argument('--seed', type=int, default=2019,
                   help='training seed: initialisation, data order, per-example start vectors and the per-epoch '
                        'test pass' if training else
                   'seed of the PGD starts and of the estimate methods\' start vectors')
    g.add_argument('--cert_seed', type=int, default=None,
                   help='seed of the start vectors of the reported guaranteed certificates'
                        + (' (the final report)' if training else '')
                        + '; default: a secret seed drawn from the OS, printed in the log (pass it to repeat '
                          'a run); a seed others know lets them build a model that defeats it')
    g.add_argument('--device', default=default_device(), help='cuda when available, else cpu')
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    finish_args(p, args, training)
    return args


def _optimiser_flags(g, lr, end_lr):
    g.add_argument('--opt', choices=['adam', 'sgd'], default='adam', help='optimiser')
    g.add_argument('--lr', type=float, default=lr, help='initial learning rate')
    g.add_argument('--end_lr', type=float, default=end_lr, help='learning rate of the last epoch (--lr_scheduler exp)')
    g.add_argument('--momentum', type=float, default=0.9, help='momentum (--opt sgd)')
    g.add_argument('--weight_decay', type=float, default=0.0, help='weight decay (--opt sgd)')
    g.add_argument('--lr_scheduler', choices=['exp', 'step', 'multistep'], default='exp',
                   help='exp: constant, then exponential decay to --end_lr; step: x --gamma every --step_size '
                        'epochs after the ramp-up; multistep: x --gamma at each --wd_list epoch')
    g.add_argument('--more', type=int, default=25, help='extra epochs at the initial lr before exp decay')
    g.add_argument('--step_size', type=int, default=10, help='epochs between lr decays (--lr_scheduler step)')
    g.add_argument('--gamma', type=float, default=0.5, help='lr decay factor (--lr_scheduler step, multistep)')
    g.add_argument('--wd_list', nargs='*', type=int, default=None,
                   help='lr milestones, epochs (default: none; --lr_scheduler multistep needs them)')


def _performance_flags(g):
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
                        '(docs/method.md §2); final = iterate without autograd, differentiate <v, D W D u> with u, v '
                        'fixed (same values, same gradient at convergence, much cheaper)')


def finish_args(parser, args, training=True):
    """Validate flags and add derived fields; bad values end with ``parser.error`` (one line)."""
    if args.model not in model_names(args.data):
        parser.error(f"--model {args.model} does not exist for --data {args.data}; "
                     f"choose one of {', '.join(model_names(args.data))}")
    positive = ['test_batch_size', 'test_sniter', 'test_opt_iter', 'niter', 'restarts']
    if training:
        positive += ['epochs', 'batch_size', 'sniter', 'opt_iter', 'step_size']
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1')
    for name in ('limit_train', 'limit_test'):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1')
    if args.workers < 0:
        parser.error('--workers must be >= 0')
    if training:
        _check_training(parser, args)
    if getattr(args, 'spectral', None) == 'guaranteed' and args.translation == 'iterative':
        parser.error('--translation iterative is an estimate; guaranteed certificates (--spectral guaranteed) '
                     'use the exact last layer: drop --translation or choose --spectral lanczos/power')
    check_numbers(parser, args)
    _certification_seed(parser, args, training)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error(f'--device {args.device} requested but CUDA is not available')
    args.alpha = args.epsilon / 4 if args.alpha is None else args.alpha
    if training:
        args.augmentation = not args.no_augmentation
        args.shuffle = not args.no_shuffle
        args.save = not args.no_save
        args.prefix = os.path.join('pretrained', f'{args.prefix}_{args.model}')
    return args


def _check_training(parser, args):
    """The checks of the flags only training has (schedule, loader, lr schedule)."""
    for name in ('warmup', 'rampup', 'more', 'tightness'):
        if getattr(args, name) < 0:
            parser.error(f'--{name} must be >= 0')
    if args.rampup < 1:
        parser.error('--rampup must be at least 1')
    if args.warmup + args.rampup >= args.epochs:
        parser.error(f'--warmup + --rampup ({args.warmup + args.rampup}) must be below --epochs ({args.epochs}): '
                     'the best model is kept from the end of the ramp-up on')
    if args.loader == 'device' and not data_load.dataset(args.data).device_loader:
        parser.error(f'--loader device holds MNIST/CIFAR-10 on the device; {args.data} is read from '
                     'image folders (use --loader torch or auto)')
    if args.lr_scheduler == 'multistep' and not args.wd_list:
        parser.error('--lr_scheduler multistep needs --wd_list milestones')
    half = args.epochs // 2
    if args.lr_scheduler == 'exp' and half + args.more < args.epochs and half <= args.more:
        parser.error(f'--lr_scheduler exp: the decay would start at epoch {half + args.more} but '
                     f'--epochs // 2 ({half}) must exceed --more ({args.more}); change --more')


def _certification_seed(parser, args, training):
    """``--cert_seed`` in range, or drawn from the OS (``cert_seed_drawn``); ``reporting``: whether
    this namespace's certificates are reported (seeded by ``--cert_seed``) or, in training, the
    per-epoch pass's (seeded by ``--seed``, so that a run repeats)."""
    if args.cert_seed is not None and not 0 <= args.cert_seed < settings.SEED_LIMIT:
        parser.error(f'--cert_seed must be in [0, 2**63), not {args.cert_seed}')
    args.cert_seed_drawn = args.cert_seed is None
    if args.cert_seed_drawn:
        args.cert_seed = settings.secret_seed()
    args.reporting = not training


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
    """(eps_i, kappa_i) for batch i of n in a robust epoch (the authors' increment, docs/method.md §4)."""
    frac = i / n
    eps = eps_epoch + frac * (args.epsilon - args.starting_epsilon) / args.rampup
    kappa = kappa_epoch + frac * (args.kappa - args.starting_kappa) / args.rampup
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
