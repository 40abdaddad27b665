"""Seconds per training step (bound pass + backward + optimiser step): authors' layout vs ours.

Both configurations run in one process on copies of one model, interleaved (A, B, B, A, ...) so
that machine noise hits both alike; the table gives the median (and range) over ``--repeats``
steps after ``--warmup`` steps each. Default: c6f2_relux, batch 128, sniter 2, opt_iter 1 (issue 2).

    python bench/step.py --device cpu
    python bench/step.py --device cuda --batch_size 256
    python bench/step.py --variant "unrolled=--power_grad unrolled"   # extra 'ours' variants
"""
import argparse

import common  # noqa: F401  (puts the repository on sys.path)
import torch

from common import (Ours, build_pair, device_peak_bytes, gib, host_peak_bytes, host_rss_bytes, interleaved,
                    machine_lines, make_args, median, print_table, reset_device_peak, reset_host_peak, spread)
import data_load
import ranks


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--model', default='c6f2_relux')
    p.add_argument('--batch_size', type=int, default=128)
    p.add_argument('--sniter', type=int, default=2)
    p.add_argument('--opt_iter', type=int, default=1)
    p.add_argument('--repeats', type=int, default=5, help='timed steps per configuration')
    p.add_argument('--warmup', type=int, default=1, help='untimed steps per configuration first')
    p.add_argument('--examples', type=int, default=None,
                   help='examples in the per-example stores (default 8 batches)')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch\'s)')
    p.add_argument('--variant', action='append', default=[], metavar='NAME=FLAGS',
                   help='also time ours with extra training flags, e.g. "unrolled=--power_grad unrolled"')
    p.add_argument('--no_authors', action='store_true', help='time only ours (and its variants)')
    p.add_argument('--quick', action='store_true', help='2 timed steps, batch 64')
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.batch_size = 2, min(args.batch_size, 64)
    return args


def main(argv=None):
    opts = parse(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    args = make_args(opts.model, opts.batch_size, opts.sniter, opts.opt_iter, device)
    runtime = ranks.Runtime(device)
    examples = opts.examples or 8 * opts.batch_size
    authors, ours = build_pair(opts.model, args, runtime, examples)
    configs = [ours] if opts.no_authors else [authors, ours]
    for spec in opts.variant:
        name, _, flags = spec.partition('=')
        variant = Ours(_copy_model(ours.model), make_args(opts.model, opts.batch_size, opts.sniter, opts.opt_iter,
                                                           device, flags.split()), runtime, examples)
        variant.name = f'ours, {name}'
        configs.append(variant)

    shape = data_load.input_shape(args.data)
    classes = data_load.num_classes(args.data)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.rand(opts.batch_size, *shape, generator=generator),
                torch.randint(classes, (opts.batch_size,), generator=generator),
                torch.randperm(examples, generator=generator)[:opts.batch_size]) for _ in range(4)]
    eps, kappa = args.epsilon_train, 0.5
    state = {'round': {}}
    peaks = {c.name: 0 for c in configs}
    host = {c.name: 0 for c in configs}

    def run(config):
        k = state['round'].get(config.name, 0)
        state['round'][config.name] = k + 1
        x, y, index = batches[k % len(batches)]
        before = host_rss_bytes()
        reset_host_peak()
        reset_device_peak(device)
        config.step(x.to(device), y.to(device), index, eps, kappa)
        peaks[config.name] = max(peaks[config.name], device_peak_bytes(device))
        host[config.name] = max(host[config.name], host_peak_bytes() - before)

    times, cpu = interleaved(configs, run, opts.repeats, opts.warmup, device)

    print(f'# training step: {opts.model}, batch {opts.batch_size}, sniter {opts.sniter}, opt_iter {opts.opt_iter}, '
          f'eps {eps:.4f}, {opts.device}')
    for line in machine_lines(device):
        print(f'# {line}')
    print(f'# median of {opts.repeats} interleaved steps per configuration after {opts.warmup} warm-up step(s); '
          f'stores hold {examples} examples; step host MiB = peak resident memory during a step above the '
          f'resident memory before it; CPU s = process CPU time (all threads)')
    base = median(times[configs[0].name])
    base_cpu = median(cpu[configs[0].name])
    header = ['configuration', 'store', 's/step (median)', 'range', f'vs {configs[0].name}', 'CPU s/step', 'CPU ratio',
              'step host MiB']
    if device.type == 'cuda':
        header.append('peak device GiB')
    rows = []
    for c in configs:
        m = median(times[c.name])
        m_cpu = median(cpu[c.name])
        row = [c.name, c.store_line(), f'{m:.3f}', spread(times[c.name]), f'{m / base:.2f}x', f'{m_cpu:.2f}',
               f'{m_cpu / base_cpu:.2f}x', f'{host[c.name] / 2**20:.0f}']
        if device.type == 'cuda':
            row.append(gib(peaks[c.name]))
        rows.append(row)
    print_table(header, rows)
    return times


def _copy_model(model):
    import copy
    return copy.deepcopy(model)


if __name__ == '__main__':
    main()
