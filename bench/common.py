"""Shared pieces of the benchmarks: the two configurations, timing, memory and machine facts.

"authors' layout" = ``bench/authors_step.py`` (the published code's structure, fp32 host store);
"ours" = the project's own training step (``trainer.train_robust_epoch``) with its defaults.
"""
import copy
import os
import platform
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import data_load  # noqa: E402
import local_bound  # noqa: E402
import trainer  # noqa: E402
import utils  # noqa: E402
from authors_step import AuthorsStore, AuthorsTrainer  # noqa: E402  (bench/ is on sys.path)

DATA_OF = {'relux': 'cifar10', 'c6f2_relux': 'cifar10', 'c6f2_clmaxmin': 'cifar10', 'standrelu': 'cifar10',
           'tinyimagenet_relux': 'tinyimagenet', 'tiny_clmaxmin': 'tinyimagenet'}


# ----------------------------------------------------------------------------- machine

def cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def machine_lines(device):
    lines = [f'torch {torch.__version__}, python {platform.python_version()}, '
             f'{torch.get_num_threads()} intra-op threads, {os.cpu_count()} logical CPUs: {cpu_model()}']
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        lines.append(f'device: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}')
    else:
        lines.append('device: cpu')
    try:
        lines.append(f'load average at start: {os.getloadavg()[0]:.2f}')
    except OSError:
        pass
    return lines


# ----------------------------------------------------------------------------- memory

def reset_host_peak():
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False if not possible."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def host_peak_bytes():
    """Peak resident memory of this process: VmHWM (resettable) or ru_maxrss."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def host_rss_bytes():
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        return 0


def reset_device_peak(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def device_peak_bytes(device):
    return torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else 0


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def gib(nbytes):
    return f'{nbytes / 2**30:.2f}'


# ----------------------------------------------------------------------------- configurations

def make_args(model, batch_size, sniter, opt_iter, device, extra=()):
    """Our real flag namespace (every default as a user gets it) for a benchmark configuration."""
    data = DATA_OF[model]
    argv = ['--data', data, '--model', model, '--batch_size', str(batch_size), '--sniter', str(sniter),
            '--opt_iter', str(opt_iter), '--device', str(device), '--no_save', '--verbose', '0',
            '--epochs', '3', '--warmup', '0', '--rampup', '2', *extra]
    return utils.argparser(data=data, model=model, argv=argv)


class Ours:
    """Our training step: ``trainer.train_robust_epoch`` over one batch, our store and defaults."""

    name = 'ours'

    def __init__(self, model, args, runtime, num_examples):
        self.args, self.runtime = args, runtime
        self.model = model
        self.net = local_bound.BoundedModel(model)
        self.optimizer = utils.make_optimizer(args, model)
        self.store = trainer.make_store(model, args, runtime, num_examples, None, args.seed + 1)

    def store_line(self):
        s = self.store
        return f'{s.nbytes / 2**20:.0f} MiB {str(s.dtype).split(".")[-1]} on {s.device}'

    def step(self, x, y, index, eps, kappa):
        with local_bound.compiled_kernels(self.args.compile):   # configurations alternate in one process
            return trainer.train_robust_epoch(self.net, [(x, y, index)], self.optimizer, self.args, self.runtime,
                                              0, eps, kappa, self.store, None)

    def epoch(self, loader, eps, kappa):
        with local_bound.compiled_kernels(self.args.compile):
            return trainer.train_robust_epoch(self.net, loader, self.optimizer, self.args, self.runtime,
                                              0, eps, kappa, self.store, None)


class Authors:
    """The published layout (bench/authors_step.py): fp32 store in (pinned) host memory."""

    name = "authors' layout"

    def __init__(self, model, args, runtime, num_examples):
        self.args, self.runtime = args, runtime
        self.model = model
        self.optimizer = utils.make_optimizer(args, model)
        shape = data_load.input_shape(args.data)
        self.store = AuthorsStore(model, shape, num_examples, seed=args.seed + 1,
                                  pin=runtime.device.type == 'cuda')
        self.trainer = AuthorsTrainer(model, self.optimizer, self.store, sniter=args.sniter,
                                      opt_iter=args.opt_iter, gloro=args.gloro, device=runtime.device)

    def store_line(self):
        pinned = ' pinned' if self.runtime.device.type == 'cuda' else ''
        return f'{self.store.nbytes / 2**20:.0f} MiB float32 on cpu{pinned}'

    def step(self, x, y, index, eps, kappa):
        return self.trainer.step(x, y, index, eps, kappa)

    def epoch(self, loader, eps, kappa):
        n = len(loader)
        for i, (x, y, index) in enumerate(loader):
            eps_i, kappa_i = utils.batch_schedule(self.args, eps, kappa, i, n)
            self.trainer.step(x, y, index, eps_i, kappa_i)


def build_pair(model_name, args, runtime, num_examples, seed=0):
    """(authors, ours) configurations on identical copies of one freshly initialised model."""
    torch.manual_seed(seed)
    base = utils.select_model(args.data, model_name, args.init, runtime.device)
    ours = Ours(copy.deepcopy(base), args, runtime, num_examples)
    authors = Authors(copy.deepcopy(base), args, runtime, num_examples)
    return authors, ours


# ----------------------------------------------------------------------------- timing

def interleaved(configs, run, repeats, warmup, device):
    """Seconds of ``run(config)`` per config, alternating A, B, B, A ... after ``warmup`` rounds each.

    Returns ({name: wall seconds}, {name: CPU seconds of this process, all threads}). On a busy
    machine the CPU seconds are the steadier figure of the work done.
    """
    times = {c.name: [] for c in configs}
    cpu = {c.name: [] for c in configs}
    for r in range(warmup + repeats):
        order = configs if r % 2 == 0 else configs[::-1]   # neither always goes first
        for c in order:
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            run(c)
            sync(device)
            if r >= warmup:
                times[c.name].append(time.perf_counter() - start)
                cpu[c.name].append(time.process_time() - start_cpu)
    return times, cpu


def median(values):
    return statistics.median(values) if values else float('nan')


def spread(values):
    """'min-max' of a list of seconds."""
    return f'{min(values):.3f}-{max(values):.3f}' if values else '-'


def print_table(header, rows):
    """A GitHub-markdown table."""
    widths = [max(len(str(h)), *(len(str(r[k])) for r in rows)) for k, h in enumerate(header)]
    line = lambda cells: '| ' + ' | '.join(str(c).ljust(w) for c, w in zip(cells, widths)) + ' |'  # noqa: E731
    print(line(header))
    print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    for r in rows:
        print(line(r))
