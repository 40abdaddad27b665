"""Every CUDA path of the project in one command, with step and epoch times (issue: GPU check).

    python bench/gpu_check.py                       # on a GPU machine: about 5 minutes
    python bench/gpu_check.py --device cpu --tiny   # the same checks at a tiny size (about a minute)

Checks, each reported PASS / FAIL / SKIP with its figures:

1. ``device loader``: ``loaders.build_loaders`` with ``--loader device`` on the bundled real digits
   (``samples/mnist``): one epoch, batches on the device.
2. ``store ...``: short certified training runs (``trainer.main``, real digits) with the
   per-example store on the device in fp32, in pinned host memory, on the device in fp16, and with
   ``--amp`` warm-up; each prints its final certified error (the reported, guaranteed procedure).
   The fp16 store's certified error is compared with the fp32 one.
3. ``torchrun``: the training script under ``torchrun`` with one process per GPU (NCCL), or two
   processes with gloo on CPU.
4. ``certify``: ``evaluate.py`` on the device, guaranteed norms, on a trained checkpoint.
5. ``step`` / ``epoch``: ``bench/step.py`` and ``bench/epoch.py`` (ours against the authors'
   layout: seconds per step and per epoch, peak device memory).

Exit status 1 when a check fails. Nothing is downloaded; the figures are printed, and the last lines
are a table to paste into the README.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path)
import torch

import loaders
import ranks
import trainer
import utils
from common import machine_lines, print_table

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / 'samples' / 'mnist'


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cpu', 'cuda'])
    p.add_argument('--tiny', action='store_true', help='tiny sizes (what the CPU test runs)')
    p.add_argument('--data_dir', default=str(SAMPLES), help='real MNIST digits (torchvision layout)')
    p.add_argument('--skip', nargs='*', default=[], help='check names to skip (e.g. torchrun epoch)')
    p.add_argument('--out', default=None, help='folder for the runs (default: a temporary one)')
    return p.parse_args(argv)


def sizes(args):
    """Training/test digits, epochs, batch and the bench flags for the chosen size."""
    if args.tiny:
        return dict(train=128, test=32, epochs=2, batch=32, step=['--batch_size', '16', '--repeats', '1',
                    '--warmup', '0', '--examples', '64', '--model', 'relux'],
                    epoch=['--examples', '128', '--batch_size', '32', '--model', 'relux', '--warmup_steps', '1'])
    return dict(train=1800, test=300, epochs=4, batch=64, step=['--repeats', '5'], epoch=['--quick'])


def training_flags(args, size, prefix, extra=()):
    return ['--data_dir', args.data_dir, '--prefix', prefix, '--epochs', str(size['epochs']), '--warmup', '0',
            '--rampup', '1', '--gloro', '--sniter', '2', '--opt_iter', '2', '--epsilon_train', '1.75',
            '--batch_size', str(size['batch']), '--test_sniter', '20', '--test_opt_iter', '20', '--niter', '5',
            '--workers', '0', '--verbose', '0', '--device', args.device,
            '--limit_train', str(size['train']), '--limit_test', str(size['test']), *extra]


def train_run(args, size, prefix, extra=()):
    """One short training in this process; (final report, seconds)."""
    import functools
    parse = functools.partial(utils.argparser, argv=training_flags(args, size, prefix, extra), data='mnist',
                              model='relux', epsilon=1.58)
    start = time.perf_counter()
    torch.manual_seed(0)
    report = trainer.main(parse)
    if args.device == 'cuda':
        torch.cuda.synchronize()
    return report, time.perf_counter() - start


def check_device_loader(args, size):
    flags = training_flags(args, size, 'loader', ['--loader', 'device'])
    parsed = utils.argparser(argv=flags, data='mnist', model='relux', epsilon=1.58)
    runtime = ranks.init_runtime(args.device)
    try:
        train_loader, _, _, _ = loaders.build_loaders(parsed, runtime)
        start, count = time.perf_counter(), 0
        for x, y, index in train_loader:
            assert x.device.type == args.device and y.device.type == args.device, f'batch on {x.device}'
            count += len(y)
        return f'{count} digits in {time.perf_counter() - start:.2f} s, batches on {x.device}'
    finally:
        ranks.close_runtime(runtime)


STORES = {   # name -> (run prefix, flags, needs CUDA, the fp32 run to compare with)
    'store on device, fp32': ('dev32', ['--store_device', 'cuda', '--store_dtype', 'float32'], True, None),
    'store in host memory, fp32 (pinned on CUDA)': ('host32', ['--store_device', 'cpu', '--store_dtype', 'float32'],
                                                    False, None),
    'store on device, fp16': ('dev16', ['--store_device', 'cuda', '--store_dtype', 'float16'], True,
                              'store on device, fp32'),
    'store in host memory, fp16': ('host16', ['--store_device', 'cpu', '--store_dtype', 'float16'], False,
                                   'store in host memory, fp32 (pinned on CUDA)'),
    'amp warm-up': ('amp', ['--amp', '--warmup', '1', '--epochs', None], False, None),
}
RESULTS = {}


def store_check(name):
    prefix, flags, needs_cuda, fp32 = STORES[name]

    def check(args, size):
        if needs_cuda and args.device != 'cuda':
            return None
        extra = list(flags)
        if None in extra:               # the amp run adds a warm-up epoch
            extra[extra.index(None)] = str(size['epochs'] + 1)
        report, seconds = train_run(args, size, prefix, extra)
        err = report['certified_err']
        assert 0.0 <= err <= 1.0, f'certified error {err}'
        RESULTS[name] = err
        line = f"certified error {err:.4f} (clean {report['clean_err']:.4f}) after {seconds:.1f} s"
        if fp32 in RESULTS:
            line += f'; the fp32 store gave {RESULTS[fp32]:.4f}'
        return line
    return check


def check_torchrun(args, size):
    gpus = torch.cuda.device_count() if args.device == 'cuda' else 0
    procs = gpus if gpus else 2
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={procs}',
               str(ROOT / 'train_mnist.py'), *training_flags(args, size, 'torchrun')]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=os.getcwd(), env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f'torchrun exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}')
    backend = 'NCCL' if gpus else 'gloo'
    return f'{procs} process(es), {backend}, {time.perf_counter() - start:.1f} s'


def check_certify(args, size):
    trained = sorted(Path('pretrained').glob('*_best.pth'))
    if not trained:
        raise RuntimeError('no trained checkpoint (the store checks make them)')
    prefix = str(trained[0])[:-len('_best.pth')]
    import evaluate
    start = time.perf_counter()
    result = evaluate.main(['--data', 'mnist', '--model', 'relux', '--saved_model', prefix, '--data_dir',
                            args.data_dir, '--epsilon', '1.58', '--limit_test', str(size['test']), '--niter', '5',
                            '--workers', '0', '--device', args.device, '--gloro'])
    return (f"certified error {result['certified_err']:.4f} on {result['examples']} digits, guaranteed norms, "
            f'{time.perf_counter() - start:.1f} s on {args.device}')


def bench_check(script, key):
    def check(args, size):
        command = [sys.executable, str(ROOT / 'bench' / script), '--device', args.device, *size[key]]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if done.returncode != 0:
            raise RuntimeError(f'{script} exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}')
        table = [line for line in done.stdout.splitlines() if line.startswith('|')]
        print('\n'.join(table))
        return f'{script}: ' + '; '.join(_ratio_cells(table))
    return check


def _ratio_cells(table):
    """The configuration names and seconds of a bench table, compactly."""
    if len(table) < 3:
        return ['no table']
    header = [c.strip() for c in table[0].strip('|').split('|')]
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in table[2:]]
    pick = [i for i, name in enumerate(header) if 's/' in name or 'ratio' in name or 'vs' in name or 'MiB' in name]
    return [f"{row[0]}: " + ', '.join(f'{header[i]} {row[i]}' for i in pick if i < len(row)) for row in rows]


CHECKS = {
    'device loader': check_device_loader,
    **{name: store_check(name) for name in STORES},
    'torchrun': check_torchrun,
    'certify': check_certify,
    'step': bench_check('step.py', 'step'),
    'epoch': bench_check('epoch.py', 'epoch'),
}


def run_checks(args):
    """[(name, status, line)] of every check, run in order in the current folder."""
    size, results = sizes(args), []
    for name, check in CHECKS.items():
        if name in args.skip or name.split()[0] in args.skip:
            results.append((name, 'SKIP', 'skipped by --skip'))
            continue
        start = time.perf_counter()
        try:
            line = check(args, size)
            status = 'SKIP' if line is None else 'PASS'
            line = line or 'needs CUDA'
        except Exception as error:          # every failure is reported, the other checks still run
            traceback.print_exc()
            status, line = 'FAIL', f'{type(error).__name__}: {error}'
        print(f'[{status}] {name}: {line} ({time.perf_counter() - start:.0f} s)', flush=True)
        results.append((name, status, line))
    return results


def main(argv=None):
    args = parse(argv)
    args.data_dir = str(Path(args.data_dir).resolve())
    for line in machine_lines(torch.device(args.device)):
        print(line)
    out = args.out or tempfile.mkdtemp(prefix='gpu_check_')
    os.makedirs(out, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(out)
    try:
        results = run_checks(args)
    finally:
        os.chdir(cwd)
    print()
    print_table(['check', 'status', 'figures'], [list(r) for r in results])
    failed = [name for name, status, _ in results if status == 'FAIL']
    if failed:
        print(f'{len(failed)} check(s) failed: {", ".join(failed)}')
        sys.exit(1)
    return results


if __name__ == '__main__':
    main()
