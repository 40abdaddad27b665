"""Randomised-architecture fuzz of the certifier, at scale (``fuzzing.py``; tests/test_fuzz.py runs
a small, fixed version).

Builds ``--networks`` random networks (seeds ``--seed`` onwards), certifies sampled inputs at
several eps with the guaranteed default and the refined bound, and checks every certificate
against float64 PGD and ball/sphere sampling and the independent float64 reference
(``reference.py``), every per-sample norm against the reference's. Prints how many networks,
certificates and norms were checked and how many failed (by kind and by network class); exit
status 1 on any failure.

    python bench/fuzz.py --networks 500
"""
import argparse
import sys

import common  # noqa: F401  (puts the repository on sys.path)
import torch
from tqdm import tqdm

import fuzzing
from common import machine_lines


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--networks', type=int, default=200, help='how many random networks')
    p.add_argument('--seed', type=int, default=1000, help='seed of the first network (then +1 each)')
    p.add_argument('--samples', type=int, default=12, help='inputs per network')
    p.add_argument('--eps_factors', default='0.5,1,2',
                   help='radii relative to the one where the reference certifies half of the inputs')
    p.add_argument('--steps', type=int, default=60, help='PGD steps per start and goal')
    p.add_argument('--restarts', type=int, default=4, help='PGD starts (the centre, then random ones)')
    p.add_argument('--points', type=int, default=1000, help='random points of the ball and sphere per input')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--show', type=int, default=20, help='failing networks listed')
    args = p.parse_args(argv)
    try:
        args.eps_factors = tuple(float(f) for f in args.eps_factors.split(','))
    except ValueError:
        p.exit(2, f'error: --eps_factors must be comma-separated numbers, not {args.eps_factors!r}\n')
    for name in ('networks', 'samples', 'steps', 'restarts', 'threads'):
        if getattr(args, name) < 1:
            p.exit(2, f'error: --{name} must be at least 1\n')
    if args.points < 0 or not all(f > 0 for f in args.eps_factors):
        p.exit(2, 'error: --points must be >= 0 and every eps factor > 0\n')
    return args


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    for line in machine_lines(torch.device('cpu')):
        print(line)
    effort = fuzzing.Effort(args.samples, args.eps_factors, args.steps, args.restarts, args.points)
    seeds = range(args.seed, args.seed + args.networks)
    findings = fuzzing.run(seeds, effort, progress=lambda it: tqdm(it, desc='networks', file=sys.stderr))
    print(findings.report(args.show))
    return 1 if findings.failures else 0


if __name__ == '__main__':
    sys.exit(main())
