"""The paper's point on real images: the same network trained with the global, the local and the
refined bound (same data, seeds and budget), each certified with each bound.

    python experiments/bounds.py --data mnist --out runs/bounds_mnist
    python experiments/bounds.py --data cifar10 --out runs/bounds_cifar10

MNIST: the first ``--train`` digits of ``--data_dir`` (default: the 1,500 digits bundled in
``samples/mnist``; any folder torchvision's MNIST reads) train and the first ``--test`` test digits
are certified. CIFAR-10: the first ``--train`` images of the CIFAR-10 *training* set train and its
last ``--test`` are held out and certified; the images are those of ``--subset`` (an .npz of uint8
``x`` [N, 3, 32, 32] and ``y``) or else of torchvision's CIFAR-10 in ``--data_dir`` (default
``data/``, downloaded there when possible). The figures are not the paper's (a few thousand images,
minutes of training).

Per training bound B it writes ``OUT/pretrained/B_<model>_*`` (log, metrics CSV, checkpoints);
per certification bound C the radius CSV ``OUT/B-trained_C-certified_radius.csv`` (guaranteed
norms, ``radius.dataset_radii``); then ``OUT/summary.md`` (certified accuracy at ``--eps`` of
every pair, and the median refined / local bound ratio) and the figures of ``plots.py`` in
``OUT/figures``. Interrupted, it starts again where it stopped (finished files are kept).
"""
import csv
import functools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset, TensorDataset  # noqa: E402

import checkpoints  # noqa: E402
import data_load  # noqa: E402
import plots  # noqa: E402
import local_bound  # noqa: E402
import radius  # noqa: E402
import trainer  # noqa: E402
import utils  # noqa: E402
from settings import CERTIFIED, LANCZOS  # noqa: E402

BOUNDS = ('global', 'local', 'refined')
RECIPES = {   # per data set: model, eps, and the training flags (the README's quick recipe for MNIST)
    'mnist': dict(model='relux', eps=1.58, flags=[
        '--gloro', '--sniter', '2', '--opt_iter', '2', '--epsilon_train', '1.75', '--batch_size', '64',
        '--rampup', '3', '--warmup', '0']),
    'cifar10': dict(model='c6f2_relux', eps=0.02, flags=[      # minutes, not the paper's 800 epochs: small eps
        '--sniter', '2', '--opt_iter', '2', '--epsilon_train', '0.03', '--batch_size', '128',
        '--rampup', '2', '--warmup', '1', '--lr', '1e-3', '--end_lr', '1e-4']),
}


def parse_args(argv=None):
    p = utils.OneLineParser(description=__doc__)
    p.add_argument('--data', choices=sorted(RECIPES), required=True)
    p.add_argument('--data_dir', default=None,
                   help='MNIST: a folder torchvision reads (default: the bundled samples/mnist); '
                        'CIFAR-10 without --subset: where torchvision finds or downloads it, data/)')
    p.add_argument('--subset', default=None, help='CIFAR-10: an .npz of uint8 x [N, 3, 32, 32] and y (real '
                                                  'training images) instead of torchvision\'s CIFAR-10 (default: none)')
    p.add_argument('--train', type=int, default=None, help='training images (default: 4000)')
    p.add_argument('--test', type=int, default=100, help='held-out images certified')
    p.add_argument('--epochs', type=int, default=None, help='training epochs (default: 5)')
    p.add_argument('--eps', type=float, default=None, help='evaluation eps (default: MNIST 1.58, the paper\'s; '
                                                           'CIFAR-10 0.02, for 5 epochs trained at 0.03)')
    p.add_argument('--bounds', nargs='+', choices=BOUNDS, default=list(BOUNDS), help='training bounds')
    p.add_argument('--model', default=None, help="architecture (default: the recipe's; e.g. c6f2_clmaxmin)")
    p.add_argument('--radius_tol', type=float, default=0.1, help='relative tolerance of the radius search')
    p.add_argument('--grid', type=int, default=6, help='grid points of the radius search up to 3 x eps')
    p.add_argument('--sniter', type=int, default=2000, help='most Lanczos steps per guaranteed norm')
    p.add_argument('--seed', type=int, default=0, help='seed of training and certification')
    p.add_argument('--threads', type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument('--out', required=True, help='folder of the runs, CSVs, summary and figures')
    args = p.parse_args(argv)
    recipe = RECIPES[args.data]
    args.model = args.model or recipe['model']
    args.eps = recipe['eps'] if args.eps is None else args.eps
    args.train = args.train or 4000
    args.epochs = args.epochs or 5
    if args.data_dir is None:
        args.data_dir = str(ROOT / 'samples' / 'mnist') if args.data == 'mnist' else 'data/'
    return args


def datasets(args):
    """(train set, test set) of real images, as the module docstring says."""
    if args.data == 'mnist':
        train_set, test_set = data_load.build_datasets('mnist', args.data_dir, download=False)
        return Subset(train_set, range(min(args.train, len(train_set)))), Subset(test_set, range(args.test))
    x, y = cifar_images(args)
    if args.train + args.test > len(y):
        raise data_load.DataNotFoundError(f'{len(y)} CIFAR-10 images, fewer than --train + --test '
                                          f'({args.train} + {args.test})')
    return TensorDataset(x[:args.train], y[:args.train]), TensorDataset(x[-args.test:], y[-args.test:])


def cifar_images(args):
    """CIFAR-10 training images (float in [0, 1]) and labels: ``--subset``'s, else torchvision's."""
    if args.subset is not None:
        try:
            arrays = np.load(args.subset)
            return torch.from_numpy(arrays['x']).float().div(255), torch.from_numpy(arrays['y']).long()
        except (OSError, KeyError, ValueError) as error:
            raise data_load.DataNotFoundError(f'--subset {args.subset}: not an .npz with x and y ({error})') from error
    train_set, _ = data_load.build_datasets('cifar10', args.data_dir, augmentation=False, download=True)
    x = torch.from_numpy(train_set.data).permute(0, 3, 1, 2).float().div(255)
    return x, torch.as_tensor(train_set.targets).long()


TIGHTNESS_EXAMPLES = 16     # converged local / global ratios per epoch (the tightness figure, left)


def train(args, bound, train_set, test_set):
    """Train with ``bound`` (skipped when its best checkpoint exists); the checkpoint prefix."""
    prefix = Path(args.out) / 'pretrained' / f'{bound}_{args.model}'
    if Path(f'{prefix}_best.pth').exists():
        return prefix
    argv = RECIPES[args.data]['flags'] + [
        '--bound', bound, '--epochs', str(args.epochs), '--epsilon', str(args.eps), '--prefix', bound,
        '--test_sniter', '50', '--test_opt_iter', '50', '--niter', '10', '--workers', '0', '--verbose', '0',
        '--device', 'cpu', '--seed', str(args.seed), '--tightness', str(TIGHTNESS_EXAMPLES)]
    parse = functools.partial(utils.argparser, argv=argv, data=args.data, model=args.model, epsilon=args.eps)
    cwd = os.getcwd()
    os.chdir(args.out)
    try:
        torch.manual_seed(args.seed)
        trainer.main(parse, train_set, test_set)
    finally:
        os.chdir(cwd)
    return prefix


def certify(args, prefix, bound, test_set):
    """Radius CSV of the checkpoint ``prefix`` with the guaranteed ``bound``; (rows, seconds)."""
    path = Path(args.out) / f'{prefix.name.split("_")[0]}-trained_{bound}-certified_radius.csv'
    timing = path.with_name(path.name.replace('_radius.csv', '_seconds.txt'))
    if path.exists() and timing.exists():           # finished by an earlier run
        return _read_rows(path), float(timing.read_text())
    model, _ = checkpoints.load_model(f'{prefix}_best.pth', args.data, args.model)
    model.eval()
    settings = CERTIFIED.replace(bound=bound, sniter=args.sniter, seed=args.seed)
    loader = DataLoader(data_load.IndexedDataset(test_set), batch_size=100, shuffle=False)
    start = time.time()
    rows, _ = radius.dataset_radii(model, loader, device='cpu', eps_max=3 * args.eps, settings=settings,
                                   eval_eps=args.eps, anchors=data_load.dataset(args.data).paper_radii,
                                   tol=args.radius_tol, grid=args.grid)
    seconds = time.time() - start
    radius.write_radius_csv(path, rows)
    with open(path.with_name(path.name.replace('_radius.csv', '_args.json')), 'w') as f:
        json.dump({'epsilon': args.eps, 'data': args.data, 'model': args.model, 'bound': bound}, f)
    timing.write_text(f'{seconds:.1f}\n')
    return rows, seconds


def _read_rows(path):
    """The rows of a CSV written by an earlier run, numbers as floats and words as strings."""
    with open(path, newline='') as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text):
    try:
        return float(text)
    except ValueError:
        return text


def summary_lines(args, table):
    """Markdown: clean accuracy and certified accuracy at eps/4, eps/2 and eps of every (training,
    certification) pair, the median bound at eps and the time of the radius search."""
    radii_shown = (args.eps / 4, args.eps / 2, args.eps)
    lines = [f'# {args.data}: {args.model}, {args.epochs} epochs on {args.train} images, '
             f'{args.test} held-out images, eps {args.eps:.4f}', '',
             '| trained with | certified with | clean acc | ' + ' | '.join(f'certified at {r:.3g}' for r in radii_shown)
             + ' | median bound at eps | radius search time |', '|---|---|---|---|---|---|---|---|']
    for (trained, certified), (rows, seconds) in table.items():
        correct = np.array([r['correct'] for r in rows], dtype=bool)
        radii = np.array([r['radius'] for r in rows])
        bound = np.median([r['local_bound_eps'] for r in rows]) if certified != 'global' else rows[0]['global_bound']
        shown = ' | '.join(f'{(correct & (radii >= r)).mean():.2f}' for r in radii_shown)
        lines.append(f'| {trained} | {certified} | {correct.mean():.2f} | {shown} | {bound:.4g} | {seconds:.0f} s |')
    return lines


RATIO_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)


def bound_ratios(args, prefix, test_set):
    """Per test image and eps in ``RATIO_FRACTIONS`` x eps: the local and the refined bound over the
    global one (converged Lanczos estimates over the float64 converged global product), as rows."""
    path = Path(args.out) / f'{prefix.name.split("_")[0]}-trained_ratios.csv'
    if path.exists():
        return _read_rows(path)
    model, _ = checkpoints.load_model(f'{prefix}_best.pth', args.data, args.model)
    model.eval()
    x = torch.stack([test_set[i][0] for i in range(len(test_set))])
    glob = local_bound.global_lipschitz(model, input_shape=x.shape[1:], precise=True)
    rows = []
    for fraction in RATIO_FRACTIONS:
        for bound in ('local', 'refined'):
            settings = LANCZOS.replace(bound=bound)
            values = torch.cat([local_bound.local_lipschitz(model, x[s:s + 100], args.eps * fraction, settings)
                                for s in range(0, len(x), 100)])
            rows += [{'eps': args.eps * fraction, 'bound': bound, 'index': i, 'ratio': float(v) / glob}
                     for i, v in enumerate(values)]
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['eps', 'bound', 'index', 'ratio'])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    try:
        train_set, test_set = datasets(args)
    except data_load.DataNotFoundError as error:
        utils.exit_user_error(error)
    table = {}
    for trained in args.bounds:
        prefix = train(args, trained, train_set, test_set)
        for certified in BOUNDS:
            table[trained, certified] = certify(args, prefix, certified, test_set)
            print(summary_lines(args, {(trained, certified): table[trained, certified]})[-1], flush=True)
    lines = summary_lines(args, table)
    Path(args.out, 'summary.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    written = write_figures(args, table)
    ratios = {b: bound_ratios(args, Path(args.out) / 'pretrained' / f'{b}_{args.model}', test_set) for b in args.bounds}
    figure = plots.bound_ratio_figure({f'{b}-trained': rows for b, rows in ratios.items()},
                                      f'{args.model} on {args.data}, {args.test} held-out images')
    written += plots.save_figure(figure, str(Path(args.out) / 'figures'), 'bound_ratio')
    plots.plt.close(figure)
    print('figures:', ', '.join(written))


SHOWN_PAIRS = (('global', 'global'), ('local', 'local'), ('local', 'global'), ('refined', 'refined'),
               ('local', 'refined'))    # certified-accuracy curves: each run with its own bound, and the
                                        # local-trained network with the other two


def write_figures(args, table):
    """certified_accuracy, tightness and varying (``plots.py``) in OUT/figures; the written paths."""
    out = Path(args.out)
    trained = [plots.load_run(str(out / 'pretrained' / f'{b}_{args.model}'), f'{b}-trained') for b in args.bounds]
    certified = [plots.load_run(str(out / f'{t}-trained_{c}-certified'), f'{t}-trained, certified with the {c} bound')
                 for t, c in SHOWN_PAIRS if (t, c) in table]
    own = [plots.load_run(str(out / f'{t}-trained_{t}-certified'), f'{t}-trained') for t in args.bounds]
    written = []
    for stem, figure in (('certified_accuracy', plots.certified_accuracy_figure(certified)),
                         ('tightness', plots.tightness_figure(trained + own)),
                         ('varying', plots.varying_figure(trained))):
        written += plots.save_figure(figure, str(out / 'figures'), stem)
        plots.plt.close(figure)
    return written


if __name__ == '__main__':
    main()
