"""What the refined bound buys on given weights: certified counts and time of the paper's local bound
and the refined one (docs/method.md §7), and the ratio refined / local of the bound per image.

Per model and eps: both bounds certify the same images with guaranteed norms (the reported
procedure, ``settings.CERTIFIED`` and its ``bound='refined'``); the table gives certified counts,
certificates of the local bound that the refined one lost (0 expected), seconds of each, and
quantiles of the per-image ratio refined / local of the Lipschitz product, each product from
Lanczos estimates (``settings.LANCZOS``, converged to about 1e-7; the guaranteed products stop as
soon as a decision is made, so they are not comparable across bounds).

Weights and images as in ``bench/certify.py`` (``--checkpoint MODEL=PATH``, else its cached short
training on ``--subset``; images: ``--data_dir`` test set, else the subset's held-out images).

    python bench/refined.py --models c6f2_relux,c6f2_clmaxmin --eps 0.01,0.02 --images 64 \\
        --subset ../shared/data/cifar10-subset/cifar10_train_subset.npz
"""
import argparse
import time

import common  # noqa: F401  (puts the repository on sys.path)
import torch

import certify as certify_bench
import local_bound
from common import machine_lines, print_table
from settings import CERTIFIED, LANCZOS

QUANTILES = (0.1, 0.5, 0.9)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu')
    p.add_argument('--models', default='c6f2_relux,c6f2_clmaxmin')
    p.add_argument('--eps', default='0.01,0.02', help='comma-separated radii')
    p.add_argument('--images', type=int, default=64)
    p.add_argument('--batch', type=int, default=64)
    certify_bench.source_flags(p)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--seed', type=int, default=0)
    return p.parse_args(argv)


def batches(x, y, size):
    for start in range(0, len(y), size):
        yield x[start:start + size], y[start:start + size], torch.arange(start, min(start + size, len(y)))


def certified_and_seconds(model, x, y, eps, settings, size):
    """(bool per image, seconds) of ``local_bound.certify`` over the images in batches."""
    start, certified = time.perf_counter(), []
    for xb, yb, index in batches(x, y, size):
        certified.append(local_bound.certify(model, xb, yb, eps, settings, index=index).cpu())
    return torch.cat(certified), time.perf_counter() - start


def bound_ratio(model, x, eps, size):
    """Per image: refined / local Lipschitz product, both from converged Lanczos estimates."""
    ratios = []
    for xb, _, _ in batches(x, x, size):
        local = local_bound.local_lipschitz(model, xb, eps, LANCZOS)
        refined = local_bound.local_lipschitz(model, xb, eps, LANCZOS.replace(bound='refined'))
        ratios.append((refined.double() / local.double()).cpu())
    return torch.cat(ratios)


def rows_for(name, model, x, y, eps, args):
    local, local_s = certified_and_seconds(model, x, y, eps, CERTIFIED.replace(seed=args.seed), args.batch)
    refined, refined_s = certified_and_seconds(model, x, y, eps, CERTIFIED.replace(seed=args.seed, bound='refined'),
                                               args.batch)
    ratio = bound_ratio(model, x, eps, args.batch)
    quantiles = ' / '.join(f'{float(ratio.quantile(q)):.3f}' for q in QUANTILES)
    return [name, f'{eps:g}', f'{int(local.sum())}/{len(y)}', f'{int(refined.sum())}/{len(y)}',
            str(int((local & ~refined).sum())), f'{local_s:.1f}', f'{refined_s:.1f}', quantiles,
            f'{float(ratio.max()):.4f}']


def main(argv=None):
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for line in machine_lines(device):
        print(line)
    if not (args.data_dir or args.subset):
        raise SystemExit('error: give --subset (real CIFAR-10 images) or --data_dir (the test set)')
    x, y, where = certify_bench.test_images(args, device)
    print(f'images: {where}')
    header = ['model', 'eps', 'certified local', 'certified refined', 'local lost', 'local s', 'refined s',
              'ratio refined/local q10 / median / q90', 'ratio max']
    rows = []
    for name in args.models.split(','):
        model, source = certify_bench.load_weights(name, args, device)
        print(f'{name}: {source}')
        for eps in (float(e) for e in args.eps.split(',')):
            rows.append(rows_for(name, model, x, y, eps, args))
            print_table(header, rows[-1:])
    print()
    print_table(header, rows)


if __name__ == '__main__':
    main()
