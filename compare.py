"""One table for both families: certified Local-Lip models and lolip's empirical defences, on the
same test images and the same L2 eps.

    python compare.py --data mnist --data_dir ../shared/data/mnist-mini --eps 1.58 --limit_test 300 \
        --locallip relux:pretrained/quick_relux_best.pth \
        --lolip runs/experiment01/mnist-inf-0.1-ce-tor-CNN001-pgd-0.pth --out compare_mnist

Per model: clean accuracy; PGD accuracy (the certified side's L2 attack: ``--pgd_steps`` steps of
eps/4 from a random image, clip then project); certified accuracy at eps (``local_bound.certify``;
0 for lolip models, which have no certificate); empirical local Lipschitzness (``empirical``,
denominator p = 2, over the L-infinity box of half-width eps/sqrt(d), which lies inside the L2
eps-ball), both the maximisation and the original's descent; the certified local bound
(``local_bound.local_lipschitz`` at eps: product of masked spectral norms) and the certified bound
on the empirical ratio over the same box (``empirical.certified_ratio_bound``, valid at the distances
the searches reached), where they exist.
Writes OUT.md and OUT.csv and prints the Markdown table.
"""
import csv
import math

import torch

import attacks
import checkpoints
import data_load
import empirical
import loaders
import local_bound
import settings
import utils
from lolip.archs import build_model
from lolip.grammar import GrammarError, parse_model
from settings import CERTIFIED, BoundSettings

NO_CERTIFICATE = {
    'CNN': 'no certificate: max-pooling and dropout are outside the bound pass',
    'WRN': 'no certificate: batch-norm and residual blocks are outside the bound pass',
    'Res': 'no certificate: batch-norm and residual blocks are outside the bound pass',
}
COLUMNS = ('model', 'family', 'clean_acc', 'pgd_acc', 'certified_acc', 'lip_max',
           'lip_as_published', 'local_bound', 'ratio_bound', 'note')


class CompareError(RuntimeError):
    """A checkpoint or flag that cannot be compared (one-line message)."""


def load_locallip(spec, data, device):
    """(label, model) from NAME:PATH, a Local-Lip checkpoint of model NAME."""
    name, _, path = spec.partition(':')
    if not path:
        raise CompareError(f'--locallip wants NAME:PATH (e.g. relux:pretrained/x_best.pth), not {spec!r}')
    model, _ = checkpoints.load_model(path, data, name, device=device)
    return f'{name} ({path})', model.eval()


def load_lolip(path, data, device):
    """(label, model, arch) from a lolip checkpoint (it names its --model and --dataset)."""
    state = checkpoints.load_state(path)
    if state.get('dataset') != data:
        raise CompareError(f'{path} is a lolip {state.get("dataset")!r} checkpoint, not {data!r}')
    try:
        spec = parse_model(state['model'])
    except (GrammarError, KeyError) as error:
        raise CompareError(f'{path} is not a lolip checkpoint ({error})') from error
    shape = data_load.input_shape(data)
    model = build_model(spec.arch, data_load.num_classes(data), shape[0]).to(device)
    checkpoints.load_weights(model, state['state_dict'], path, state['model'])
    return f"{state['model']} ({path})", model.eval(), spec.arch


def test_batches(data, data_dir, limit, batch_size):
    """The first ``limit`` test images of ``data`` in [0, 1] (no normalisation), in order, as
    ``(x, y, index)`` batches like every loader of the project."""
    _, test_set = data_load.build_datasets(data, data_dir, augmentation=False, normalization=False,
                                           download=False)
    subset = data_load.IndexedDataset(loaders.limited(test_set, limit))
    return list(torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False))


def certification_settings(args):
    """The certificates' settings: guaranteed norms unless ``--spectral`` asks for an estimate."""
    if args.spectral == 'guaranteed':
        return CERTIFIED.replace(sniter=args.sniter, failure_prob=args.failure_prob, seed=args.cert_seed,
                                 bound=args.bound)
    return BoundSettings(method=args.spectral, sniter=args.sniter, opt_iter=args.opt_iter, bound=args.bound,
                         translation='exact' if args.spectral == 'lanczos' else 'iterative')


def evaluate(model, batches, eps, args, certifiable):
    """The row's numbers for one model (sums over batches, then means)."""
    sums = dict(clean=0, pgd=0, certified=0, lip_max=0.0, lip_as_published=0.0, local_bound=0.0,
                ratio_bound=0.0, count=0)
    streams = {published: empirical.published_noise(args.seed) for published in (False, True)}
    for x, y, _ in batches:
        x, y = x.to(args.device), y.to(args.device)
        box = eps / math.sqrt(x[0].numel())
        torch.manual_seed(args.seed)
        adv = attacks.pgd(model, x, y, eps, norm=2, steps=args.pgd_steps, step_size=eps / 4,
                          random_start='image', order='clip_project')
        with torch.no_grad():
            sums['clean'] += int(local_bound.correct_predictions(model(x), y).sum())
            sums['pgd'] += int(local_bound.correct_predictions(model(adv), y).sum())
        nearest = None
        for published in (False, True):
            key = 'lip_as_published' if published else 'lip_max'
            ratio, points = empirical.search_points(model, x, box, norm=2, as_published=published,
                                                    generator=streams[published])
            sums[key] += float(ratio.sum())
            apart = empirical.distances(x, points, 2)
            nearest = apart if nearest is None else torch.minimum(nearest, apart)
        if certifiable:
            settings = certification_settings(args)
            sums['certified'] += int(local_bound.certify(model, x, y, eps, settings).sum())
            sums['local_bound'] += float(local_bound.local_lipschitz(model, x, eps, settings).sum())
            sums['ratio_bound'] += float(empirical.certified_ratio_bound(model, x, box, settings, norm=2,
                                                                         distance=nearest).sum())
        sums['count'] += len(y)
    n = max(sums.pop('count'), 1)
    row = {key: value / n for key, value in sums.items()}
    return {'clean_acc': row['clean'], 'pgd_acc': row['pgd'], 'certified_acc': row['certified'],
            'lip_max': row['lip_max'], 'lip_as_published': row['lip_as_published'],
            'local_bound': row['local_bound'] if certifiable else None,
            'ratio_bound': row['ratio_bound'] if certifiable else None}


def _cell(value):
    if value is None:
        return '-'
    return f'{value:.4f}' if isinstance(value, float) else str(value)


def markdown(rows, args, count):
    """The Markdown table with a heading line naming the images and eps."""
    lines = [f'{args.data}: first {count} test images, L2 eps {args.eps:g} '
             f'(empirical Lipschitzness over the L-infinity box of half-width eps/sqrt(d), p = 2)',
             '', '| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    lines += ['| ' + ' | '.join(_cell(row[c]) for c in COLUMNS) + ' |' for row in rows]
    return '\n'.join(lines) + '\n'


def write_outputs(rows, args, count):
    """OUT.md and OUT.csv; returns the Markdown text."""
    text = markdown(rows, args, count)
    with open(f'{args.out}.md', 'w') as handle:
        handle.write(text)
    with open(f'{args.out}.csv', 'w', newline='') as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: ('' if row[c] is None else row[c]) for c in COLUMNS} for row in rows)
    return text


def parser():
    p = utils.OneLineParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data', required=True, choices=('mnist', 'cifar10'), help='data set')
    p.add_argument('--data_dir', default='data/', help='where the data sets are')
    p.add_argument('--eps', type=float, required=True, help='L2 radius for every column')
    p.add_argument('--locallip', action='append', default=[], metavar='NAME:PATH',
                   help='a Local-Lip checkpoint and its model name (repeatable)')
    p.add_argument('--lolip', action='append', default=[], metavar='PATH',
                   help='a lolip checkpoint written by lolip/main.py (repeatable)')
    p.add_argument('--limit_test', type=int, help='the first N test images (default: all)')
    p.add_argument('--batch_size', type=int, default=100, help='test batch size')
    p.add_argument('--pgd_steps', type=int, default=100, help='steps of the L2 PGD attack')
    p.add_argument('--spectral', choices=('guaranteed', 'lanczos', 'power'), default='guaranteed',
                   help='norms of the certificates: guaranteed upper bounds or an estimate '
                        '(lanczos; power = the authors\' procedure)')
    p.add_argument('--bound', choices=('local', 'refined'), default='local',
                   help='the certified side\'s bound (docs/method.md §7)')
    p.add_argument('--failure_prob', type=float, default=1e-9, help='guaranteed: failure probability per certificate')
    p.add_argument('--sniter', type=int, default=2000, help='most iterations per norm of the bound')
    p.add_argument('--opt_iter', type=int, default=1000, help='iterations of the last-layer step (power)')
    p.add_argument('--seed', type=int, default=0, help='seed of the PGD starts')
    p.add_argument('--cert_seed', type=int, default=None,
                   help='seed of the guaranteed norms\' start vectors (default: a secret seed drawn from the OS, '
                        'printed; pass it to repeat a run)')
    p.add_argument('--device', default=utils.default_device(), help='cuda when available, else cpu')
    p.add_argument('--out', default='compare', help='writes OUT.md and OUT.csv')
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if not args.locallip and not args.lolip:
        p.error('give at least one --locallip NAME:PATH or --lolip PATH')
    if not 0 < args.eps <= local_bound.MAX_EPS:
        p.error(f'--eps must be in (0, {local_bound.MAX_EPS:g}] (an L2 radius on inputs in [0, 1]), not {args.eps}')
    if not 0 < args.failure_prob < 1:
        p.error('--failure_prob must lie in (0, 1)')
    if args.cert_seed is not None and not 0 <= args.cert_seed < settings.SEED_LIMIT:
        p.error(f'--cert_seed must be in [0, 2**63), not {args.cert_seed}')
    drawn = args.cert_seed is None
    if drawn:
        args.cert_seed = settings.secret_seed()
    if args.locallip:
        print(f'certificates: {certification_settings(args).describe()}'
              + (f' (drawn from the OS; --cert_seed {args.cert_seed} repeats this run)' if drawn else ''))
    try:
        batches = test_batches(args.data, args.data_dir, args.limit_test, args.batch_size)
        rows = []
        for spec in args.locallip:
            label, model = load_locallip(spec, args.data, args.device)
            rows.append({'model': label, 'family': 'Local-Lip (certified)', 'note': '',
                         **evaluate(model, batches, args.eps, args, certifiable=True)})
        for path in args.lolip:
            label, model, arch = load_lolip(path, args.data, args.device)
            rows.append({'model': label, 'family': 'lolip (empirical)', 'note': NO_CERTIFICATE[arch[:3]],
                         **evaluate(model, batches, args.eps, args, certifiable=False)})
    except (CompareError, checkpoints.CheckpointError, data_load.DataNotFoundError, local_bound.BoundError) as error:
        utils.exit_user_error(error)
    text = write_outputs(rows, args, sum(len(y) for _, y, _ in batches))
    print(text + f'written: {args.out}.md, {args.out}.csv')
    return rows


if __name__ == '__main__':
    main()
