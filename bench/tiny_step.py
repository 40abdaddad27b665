"""TinyImageNet 8C2F training step (batch 32, 200 classes): seconds and peak memory.

"ours" runs the published Tiny recipe through our trainer (``--indices 0,6,12,14,17``, fp16
stores, ``--sparse 0.01``, sniter 1, label-column translation). ``--with_authors`` adds the
authors' layout stand-in (bench/authors_step.py: fp32 store for every layer, full B x C x C
translation; it has no sparsity term and no partial store, so it does a little *less* than the
published Tiny code). The authors' layout needs several GiB for the 32 x 200 x 200 x 256 pairwise
tensors, so it is off by default on CPU.

    python bench/tiny_step.py --device cuda --with_authors
    python bench/tiny_step.py --device cpu --repeats 2
"""
import argparse
import copy
import os
import sys

import common  # noqa: F401  (puts the repository on sys.path)
import torch

import ranks  # noqa: E402
import utils
from common import (Authors, Ours, device_peak_bytes, gib, host_peak_bytes, host_rss_bytes, interleaved,
                    machine_lines, make_args, median, print_table, reset_device_peak, reset_host_peak, spread)

sys.path.insert(0, os.path.join(common.ROOT, 'TinyImagenet'))
import train_tiny_multi  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cpu', 'cuda'])
    p.add_argument('--model', default='tinyimagenet_relux', choices=['tinyimagenet_relux', 'tiny_clmaxmin'])
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--sniter', type=int, default=1)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--examples', type=int, default=None, help='examples in the stores (default 8 batches)')
    p.add_argument('--with_authors', action='store_true', help="also time the authors' layout (several GiB)")
    p.add_argument('--flags', default='', help='extra training flags for ours')
    p.add_argument('--quick', action='store_true', help='1 timed step')
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
    return args


def main(argv=None):
    opts = parse(argv)
    device = torch.device(opts.device)
    argv = ['--model', opts.model, '--batch_size', str(opts.batch_size), '--sniter', str(opts.sniter),
            '--indices', '0,6,12,14,17', '--sparse', '0.01', '--device', opts.device, '--no_save',
            '--verbose', '0', '--epochs', '3', '--rampup', '2', *opts.flags.split()]
    args = train_tiny_multi.parse(argv)
    runtime = ranks.Runtime(device)
    examples = opts.examples or 8 * opts.batch_size
    torch.manual_seed(0)
    base = utils.select_model(args.data, opts.model, args.init, device)
    configs = [Ours(copy.deepcopy(base), args, runtime, examples)]
    if opts.with_authors:
        plain = make_args(opts.model, opts.batch_size, opts.sniter, 1, device)
        configs.insert(0, Authors(copy.deepcopy(base), plain, runtime, examples))
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.rand(opts.batch_size, 3, 64, 64, generator=generator),
                torch.randint(200, (opts.batch_size,), generator=generator),
                torch.randperm(examples, generator=generator)[:opts.batch_size]) for _ in range(2)]
    rounds, host, dev = {}, {c.name: 0 for c in configs}, {c.name: 0 for c in configs}

    def run(config):
        k = rounds.get(config.name, 0)
        rounds[config.name] = k + 1
        x, y, index = batches[k % len(batches)]
        before = host_rss_bytes()
        reset_host_peak()
        reset_device_peak(device)
        config.step(x.to(device), y.to(device), index, args.epsilon_train, 0.5)
        host[config.name] = max(host[config.name], host_peak_bytes() - before)
        dev[config.name] = max(dev[config.name], device_peak_bytes(device))

    times, cpu = interleaved(configs, run, opts.repeats, opts.warmup, device)
    print(f'# TinyImageNet step: {opts.model}, batch {opts.batch_size}, 200 classes, sniter {opts.sniter}, {opts.device}')
    for line in machine_lines(device):
        print(f'# {line}')
    print(f'# median of {opts.repeats} interleaved steps after {opts.warmup} warm-up; stores hold {examples} examples; '
          f'host MiB = peak resident memory during a step above the resident memory before it')
    header = ['configuration', 'store', 's/step (median)', 'range', 'step host MiB']
    if device.type == 'cuda':
        header.append('peak device GiB')
    rows = []
    for c in configs:
        row = [c.name, c.store_line(), f'{median(times[c.name]):.3f}', spread(times[c.name]),
               f'{host[c.name] / 2**20:.0f}']
        if device.type == 'cuda':
            row.append(gib(dev[c.name]))
        rows.append(row)
    print_table(header, rows)


if __name__ == '__main__':
    main()
