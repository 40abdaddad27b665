"""Figures of one or several runs, from the CSVs that training and evaluation write.

    python plots.py --runs pretrained/local_relux pretrained/global_relux --names local global --out figures/

For every run prefix P it reads ``P_metrics.csv`` (one row per epoch, written by training),
``P_radius.csv`` (one row per test example, ``evaluate.py --radius``), ``P_lipschitz.csv`` (one
row per test example, ``empirical.write_lipschitzness_csv``) and ``P_args.json`` (the flags, for
titles); a run needs at least one of the CSVs. It writes, as PNG and PDF, the figures it has data
for:

* ``certified_accuracy``: certified accuracy against the L2 radius, one curve per run;
* ``tightness``: local / global Lipschitz bound, like with like: over training the median ratio of
  converged values (``lip_ratio_median``, training with ``--tightness N``), and its histogram over
  the test examples at the evaluation eps (both guaranteed upper bounds);
* ``loss``: clean and robust training loss over the epochs, one curve per run;
* ``varying``: fraction of varying (not fixed) neurons per activation layer over training;
* ``empirical``: empirical local Lipschitzness (both search directions) of every test example
  against its certified bound on the same ratio.

``bound_ratio_figure`` draws ``experiments/bounds.py``'s per-example local and refined over global
bound against eps (its own CSV). Curves that lie on top of each other are named in the legend's
title (``coincidence_note``).

Every figure function returns its matplotlib Figure; the plotted series are the CSV values.
"""
import csv
import itertools
import json
import os
import sys
import textwrap
from dataclasses import dataclass, field

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from matplotlib.transforms import ScaledTranslation  # noqa: E402

import utils  # noqa: E402

HISTOGRAM_BINS = 30
CURVE_POINTS = 201
COINCIDE_POINTS = 1.0       # certified-accuracy curves this close (percentage points) are said to coincide
RATIO_MIN_SPAN = 0.03       # the tightness histogram spans at least this much of the ratio (bins of 0.001)
VARYING_TOLERANCE = 0.01    # varying-neuron fractions this close (2 px on the 0-1 axis) are said to coincide


@dataclass
class Run:
    """One run's data: columns of its CSVs as float arrays (NaN for empty cells), and its flags."""
    name: str
    prefix: str
    metrics: dict = None
    radius: dict = None
    lipschitz: dict = None
    args: dict = field(default_factory=dict)


def read_csv(path):
    """``{column: array}`` of a CSV with a header line: float arrays (empty cells become NaN),
    string arrays for columns that hold words (e.g. ``bound``)."""
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = reader.fieldnames or []
    return {c: _column_array([r[c] for r in rows]) for c in columns}


def _column_array(cells):
    try:
        return np.array([float(v) if v not in ('', None) else np.nan for v in cells])
    except ValueError:
        return np.array(cells, dtype=str)


def load_run(prefix, name=None):
    """The Run of ``prefix``; FileNotFoundError when none of its CSVs exists."""
    tables = {'metrics': 'epoch', 'radius': 'radius', 'lipschitz': 'lip_max'}
    paths = {table: f'{prefix}_{table}.csv' for table in tables}
    if not any(os.path.exists(path) for path in paths.values()):
        raise FileNotFoundError(f"none of {', '.join(paths.values())} exists")
    run = Run(name or os.path.basename(prefix), prefix)
    for table, column in tables.items():
        if os.path.exists(paths[table]):
            setattr(run, table, _checked(read_csv(paths[table]), paths[table], column))
    if os.path.exists(prefix + '_args.json'):
        with open(prefix + '_args.json') as f:
            run.args = json.load(f)
    return run


def _checked(table, path, column):
    if column not in table:
        raise ValueError(f'{path} has no {column} column')
    return table


def describe(runs):
    """'<model> on <data>, eval eps <e>' from the runs' flags; distinct descriptions joined by ' | '."""
    parts = []
    for run in runs:
        text = f"{run.args.get('model', '?')} on {run.args.get('data', '?')}"
        if 'epsilon' in run.args:
            text += f", eval eps {run.args['epsilon']:.4g}"
        if not run.args:
            text = f'{run.name}: flags unknown (no _args.json)'
        if text not in parts:
            parts.append(text)
    return ' | '.join(parts)


def _finite(x, y):
    """The pairs of (x, y) where y is finite."""
    keep = np.isfinite(y)
    return x[keep], y[keep]


def _finite_values(values):
    return values[np.isfinite(values)]


def _with(runs, table, column):
    """The runs whose ``table`` ('metrics' or 'radius') has ``column`` with some finite value."""
    def has(run):
        data = getattr(run, table)
        return data is not None and column in data and np.isfinite(data[column]).any()
    return [run for run in runs if has(run)]


def _epoch_axis(ax):
    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_or_note(ax, note):
    """A legend when the panel has labelled lines, else ``note`` written across it."""
    if any(not line.get_label().startswith('_') for line in ax.get_lines()):
        ax.legend()
    else:
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha='center', va='center', color='grey')


def _bin_edges(values, min_span=0.0):
    """HISTOGRAM_BINS equal bins over the range of ``values`` (widened a little when they are all equal).
    Values spanning less than ``min_span`` get bins of ``min_span / HISTOGRAM_BINS`` at multiples of
    their width over about ``min_span`` around the values: differences far below a bin are not
    magnified, and a value just above 1 is not drawn left of 1."""
    low, high = float(values.min()), float(values.max())
    if high - low < min_span:
        width, centre = min_span / HISTOGRAM_BINS, (low + high) / 2
        first, last = np.floor((centre - min_span / 2) / width), np.ceil((centre + min_span / 2) / width)
        return np.arange(first, last + 1) * width
    pad = 0.02 * (high - low) or 0.01 * max(abs(high), 1e-12)
    return np.linspace(low - pad, high + pad, HISTOGRAM_BINS + 1)


def _log_if_wide(ax, xs, ys):
    """Log axes for the directions whose positive values span more than a decade."""
    for values, scale in ((xs, ax.set_xscale), (ys, ax.set_yscale)):
        values = values[values > 0]
        if len(values) and values.max() > 10 * values.min():
            scale('log')


def certified_fraction(radii, eps, correct=None):
    """Fraction of the examples certified at radius e, for every e in ``eps``: correctly classified
    with radius >= e (``correct`` None: every example is; a misclassified one has radius 0 but is
    never certified, so at e = 0 the curve equals clean accuracy)."""
    certified = radii[None, :] >= eps[:, None]
    if correct is not None:
        certified &= correct.astype(bool)[None, :]
    return certified.mean(axis=1)


def correct_column(radius_table):
    """Bool array: the radius CSV's ``correct`` column, else prediction == label (older CSVs)."""
    if 'correct' in radius_table:
        return radius_table['correct'] > 0.5
    return radius_table['prediction'] == radius_table['label']


LINE_STYLES = ('-', '--', '-.', ':', (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)))
MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X')
MARKER_SPACING = CURVE_POINTS // 10


def _style(k):
    """Line style and marker of the k-th curve: curves that coincide stay told apart (the markers of
    different curves fall on different points of the shared x grid)."""
    return dict(linestyle=LINE_STYLES[k % len(LINE_STYLES)], marker=MARKERS[k % len(MARKERS)], markersize=5,
                markevery=(k * MARKER_SPACING // len(MARKERS), MARKER_SPACING), linewidth=1.6)


def coinciding(curves, tolerance=0.0):
    """Groups (lists of names, two or more, in drawing order) of the curves ``{name: y array}`` of one
    shape that lie within ``tolerance`` of the group's first curve at every point."""
    groups = []
    for name, y in curves.items():
        for group in groups:
            first = curves[group[0]]
            if first.shape == y.shape and np.nanmax(np.abs(first - y), initial=0.0) <= tolerance:
                group.append(name)
                break
        else:
            groups.append([name])
    return [group for group in groups if len(group) > 1]


def coincidence_note(curves, tolerance=0.0, width=90):
    """Text telling the reader which curves lie on top of each other (``coinciding``), or None."""
    lines = []
    for group in coinciding(curves, tolerance):
        gap = max(np.nanmax(np.abs(curves[a] - curves[b]), initial=0.0) for a, b in itertools.combinations(group, 2))
        how = 'identical' if gap == 0 else f'within {gap:.2g} of each other'
        lines.append(textwrap.fill(f"{how}, drawn on top of each other: {' = '.join(group)}", width))
    return '\n'.join(lines) or None


LEGEND_DROP_PT = 40    # the legend's top this far below the axes: under the tick labels and the x label


def _legend_below(ax, columns, note=None):
    """The legend under the axes (and their x label), where it covers no curve; ``note`` (e.g.
    ``coincidence_note``) as its title."""
    below = ax.transAxes + ScaledTranslation(0, -LEGEND_DROP_PT / 72, ax.figure.dpi_scale_trans)
    legend = ax.legend(loc='upper center', bbox_to_anchor=(0.5, 0), bbox_transform=below, ncol=columns,
                       fontsize=8, frameon=False, title=note, title_fontsize=8)
    if note:
        legend.get_title().set_color('dimgrey')
    return legend


def certified_accuracy_figure(runs):
    """Certified accuracy (%) against the L2 radius, one curve per run with a radius CSV."""
    runs = _with(runs, 'radius', 'radius')
    fig, ax = plt.subplots(figsize=(6.5, 5.6))
    evals = sorted({run.args['epsilon'] for run in runs if 'epsilon' in run.args})
    top = max([float(np.nanmax(run.radius['radius'])) for run in runs] + evals + [0.0])
    eps = np.linspace(0.0, 1.05 * top if top > 0 else 1.0, CURVE_POINTS)
    curves = {run.name: 100 * certified_fraction(run.radius['radius'], eps, correct_column(run.radius)) for run in runs}
    for k, run in enumerate(runs):
        ax.plot(eps, curves[run.name], label=f"{run.name} ({len(run.radius['radius'])} examples)", **_style(k))
    for value in evals:
        ax.axvline(value, color='grey', linestyle=':', linewidth=1)
        ax.annotate(f'eval eps {value:.3g}', (value, 100), xytext=(-3, -12), textcoords='offset points',
                    ha='right', fontsize=8, color='grey')
    ax.set_xlabel('L2 radius eps (input units; pixels in [0, 1])')
    ax.set_ylabel('certified accuracy (% of test examples)')
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    _legend_below(ax, columns=1, note=coincidence_note(curves, COINCIDE_POINTS))
    ax.set_title(f'Certified accuracy vs radius\n{describe(runs)}', fontsize=10)
    fig.tight_layout()
    return fig


def _with_bound(name, table):
    """``name``, with the bound of a CSV's ``bound`` column when it is not the paper's local one."""
    bounds = set(table['bound']) if 'bound' in table and table['bound'].dtype.kind in 'US' else set()
    extra = sorted(bounds - {'local', ''})
    return f"{name} [{', '.join(extra)} bound]" if extra and extra[0] not in name else name


def tightness_figure(runs):
    """Local / global bound, like with like: per epoch the median ratio of converged values on the
    first test examples (metrics CSV ``lip_ratio_median``, training with ``--tightness N``), left;
    per test example at the evaluation eps (radius CSV: ``local_bound_eps`` over ``global_bound``,
    both guaranteed upper bounds), right."""
    fig, (over_time, spread) = plt.subplots(1, 2, figsize=(11, 4.6))
    notes = {over_time: _ratio_over_training(over_time, runs), spread: _ratio_histogram(spread, runs)}
    for ax, note in ((over_time, 'no per-epoch ratios\n(train with --tightness N)'),
                     (spread, 'no per-example bounds\n(radius CSV: local_bound_eps)')):
        if any(not line.get_label().startswith('_') for line in ax.get_lines()):
            _legend_below(ax, columns=1, note=notes[ax])
        else:
            ax.text(0.5, 0.5, note, transform=ax.transAxes, ha='center', va='center', color='grey')
    fig.suptitle(f'Tightness of the local Lipschitz bound\n{describe(runs)}', fontsize=10)
    fig.tight_layout()
    return fig


def _ratio_over_training(ax, runs):
    """Left panel of ``tightness_figure``: ``lip_ratio_median`` per epoch; the coincidence note."""
    curves = {}
    for k, run in enumerate(_with(runs, 'metrics', 'lip_ratio_median')):
        epochs, ratio = _finite(run.metrics['epoch'], run.metrics['lip_ratio_median'])
        name = _with_bound(run.name, run.metrics)
        ax.plot(epochs, ratio, **{**_style(k), 'markevery': 1}, label=name)
        curves[name] = ratio
    ax.axhline(1.0, color='grey', linestyle=':', linewidth=1)
    _epoch_axis(ax)
    ax.ticklabel_format(axis='y', useOffset=False)
    ax.set_ylabel('median local (or refined) / global bound\n(converged values; 1 = no gain)')
    ax.set_title('during training, first test examples\n(converged Lanczos over converged global)', fontsize=10)
    ax.grid(alpha=0.3)
    return coincidence_note(curves)


def _ratio_histogram(ax, runs):
    """Right panel of ``tightness_figure``: histogram per run of ``local_bound_eps / global_bound``
    (at least ``RATIO_MIN_SPAN`` wide); the note naming identical histograms."""
    evaluated = [r for r in _with(runs, 'radius', 'local_bound_eps') if 'global_bound' in r.radius]
    ratios = {_with_bound(run.name, run.radius): _finite_values(run.radius['local_bound_eps'] / run.radius['global_bound'])
              for run in evaluated}
    counts, label = {}, 'local (or refined) / global bound at the evaluation eps'
    if ratios:
        edges = _bin_edges(np.concatenate(list(ratios.values())), RATIO_MIN_SPAN)
        label += f' (bins of {edges[1] - edges[0]:.2g})'
        for k, (name, ratio) in enumerate(ratios.items()):
            counts[name], _ = np.histogram(ratio, bins=edges)
            ax.plot(edges, np.append(counts[name], counts[name][-1]), drawstyle='steps-post',
                    linestyle=LINE_STYLES[k % len(LINE_STYLES)], linewidth=1.6,
                    label=f'{name} (median {np.median(ratio):.3f})')
        ax.axvline(1.0, color='grey', linestyle=':', linewidth=1)
    ax.ticklabel_format(axis='x', useOffset=False)
    ax.set_xlabel(label)
    ax.set_ylabel('test examples (count per bin)')
    ax.set_title('after training, per test example\n(both guaranteed upper bounds, each within 1% of its '
                 'estimate)', fontsize=10)
    ax.grid(alpha=0.3)
    note = coincidence_note({f'{name} histogram': c for name, c in counts.items()})
    return note and note.replace('drawn on top', 'steps drawn on top')


def loss_figure(runs):
    """Clean (left) and robust (right) training loss per epoch, one curve per run."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, column, what in zip(axes, ('loss', 'robust_loss'), ('clean logits', 'worst-case logits (robust)')):
        for run in _with(runs, 'metrics', column):
            ax.plot(*_finite(run.metrics['epoch'], run.metrics[column]), marker='.', label=run.name)
        ax.set_title(what, fontsize=10)
        _epoch_axis(ax)
        ax.set_ylabel('cross-entropy (nats, training mean)')
        ax.grid(alpha=0.3)
        _legend_or_note(ax, f'no {column} column')
    fig.suptitle(f'Training loss\n{describe(runs)}', fontsize=10)
    fig.tight_layout()
    return fig


def varying_columns(metrics):
    """The ``varying_<i>`` columns of a metrics table, by layer index."""
    return sorted((c for c in metrics if c.startswith('varying_')), key=lambda c: int(c.split('_')[1]))


def varying_figure(runs):
    """Fraction of varying neurons per activation layer over training: one panel per run."""
    runs = [r for r in runs if r.metrics is not None and varying_columns(r.metrics)]
    fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(5.5 * max(1, len(runs)), 4.6), sharey=True,
                             squeeze=False)
    for ax, run in zip(axes[0], runs):
        _varying_panel(ax, run)
    axes[0][0].set_ylabel('varying neurons (fraction of the layer, test pass)')
    fig.suptitle(f'Neurons that can change inside the eps-ball\n{describe(runs)}', fontsize=10)
    fig.tight_layout()
    return fig


def _varying_panel(ax, run):
    """One run's ``varying_<i>`` columns per epoch, the legend (and which layers coincide) below."""
    curves = {}
    for k, column in enumerate(varying_columns(run.metrics)):
        epochs, fraction = _finite(run.metrics['epoch'], run.metrics[column])
        name = f"layer {column.split('_')[1]}"
        ax.plot(epochs, fraction, **{**_style(k), 'markevery': 1}, label=name)
        curves[name] = fraction
    ax.set_title(run.name, fontsize=10)
    _epoch_axis(ax)
    ax.set_xlabel(_test_eps_label(run.metrics))
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    note = coincidence_note(curves, VARYING_TOLERANCE, width=60)
    _legend_below(ax, columns=3, note='activation (module index)' + (f'\n{note}' if note else ''))


def _test_eps_label(metrics):
    """'epoch (test pass at eps a to b)' from the metrics' ``test_eps`` column, else 'epoch'."""
    values = _finite_values(metrics.get('test_eps', np.array([])))
    if not len(values):
        return 'epoch'
    low, high = values.min(), values.max()
    return f'epoch (test pass at eps {low:.3g})' if low == high else f'epoch (test pass at eps {low:.3g} to {high:.3g})'


def empirical_figure(runs):
    """Per test example: empirical ratio (y, both directions) against its certified bound (x)."""
    runs = _with(runs, 'lipschitz', 'certified_bound')
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for run in runs:
        table = run.lipschitz
        keep = np.isfinite(table['certified_bound'])
        colour = ax.plot(table['certified_bound'][keep], table['lip_max'][keep], 'o', markersize=4, alpha=0.7,
                         label=f'{run.name}: maximum (ascent)')[0].get_color()
        ax.plot(table['certified_bound'][keep], table['lip_as_published'][keep], 'x', color=colour,
                markersize=4, alpha=0.7, label=f'{run.name}: as published (descent)')
    if runs:
        low, high = ax.get_xlim()
        ax.plot([low, high], [low, high], color='grey', linestyle='--', linewidth=1, label='_diagonal')
        ax.annotate('certified bound (y = x)', (high, high), xytext=(-4, -14), textcoords='offset points',
                    ha='right', fontsize=8, color='grey')
    xs = np.concatenate([r.lipschitz['certified_bound'] for r in runs]) if runs else np.ones(1)
    ys = np.concatenate([np.r_[r.lipschitz['lip_max'], r.lipschitz['lip_as_published']] for r in runs]) \
        if runs else np.ones(1)
    _log_if_wide(ax, xs[np.isfinite(xs)], np.r_[ys[np.isfinite(ys)], xs[np.isfinite(xs)]])
    norms = {f"p = {r.lipschitz['norm'][0]:g}, L-inf box eps {r.lipschitz['eps'][0]:g}" for r in runs}
    ax.set_xlabel('certified bound on ||f(x) - f(x\')||_1 / ||x - x\'||_p (logits per input unit)')
    ax.set_ylabel('empirical ||f(x) - f(x\')||_1 / ||x - x\'||_p')
    ax.grid(alpha=0.3, which='both')
    _legend_or_note(ax, 'no certified bounds (lipschitz CSV: certified_bound)')
    ax.set_title(f"Empirical local Lipschitzness vs certified bound ({'; '.join(sorted(norms))})\n"
                 f'{describe(runs)}', fontsize=10)
    fig.tight_layout()
    return fig


def ratio_quantiles(rows, bound):
    """Per eps (sorted) of the rows with ``bound``: arrays (eps, median, 10%, 90% quantile) of ``ratio``."""
    eps = np.array(sorted({row['eps'] for row in rows if row['bound'] == bound}))
    values = [np.array([row['ratio'] for row in rows if row['bound'] == bound and row['eps'] == e]) for e in eps]
    return (eps, *(np.array([np.quantile(v, q) for v in values]) for q in (0.5, 0.1, 0.9)))


RATIO_BOUNDS = (('local', dict(linestyle='-', marker='o')), ('refined', dict(linestyle='--', marker='x')))
RATIO_TOLERANCE = 0.005     # median bound-ratio curves this close are said to coincide


def bound_ratio_figure(ratios, subtitle):
    """Median (line) and 10-90% range (band) over the test examples of the local and the refined
    bound over the global one, against eps. ``ratios``: {training name: rows with ``eps``, ``bound``
    ('local' or 'refined') and ``ratio``} (``experiments/bounds.py``: converged Lanczos estimates over
    the converged global product, like with like). One colour per training; local solid with
    circles, refined dashed with crosses."""
    fig, ax = plt.subplots(figsize=(6.5, 5.8))
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    medians = {}
    for colour, (trained, rows) in zip(colours, ratios.items()):
        for bound, style in RATIO_BOUNDS:
            eps, median, low, high = ratio_quantiles(rows, bound)
            name = f'{trained}, {bound} bound'
            ax.plot(eps, median, color=colour, markersize=5, linewidth=1.6, label=name, **style)
            ax.fill_between(eps, low, high, color=colour, alpha=0.08)
            medians[name] = median
    ax.set_xscale('log')
    ax.axhline(1.0, color='grey', linestyle=':', linewidth=1)
    ax.set_xlabel('L2 radius eps (log scale)')
    ax.set_ylabel('bound / global bound (median; band: 10-90% of examples)')
    lowest = min((min(row['ratio'] for row in rows) for rows in ratios.values() if rows), default=0.0)
    ax.set_ylim(max(0.0, lowest - 0.05), 1.02)
    ax.grid(alpha=0.3)
    _legend_below(ax, columns=2, note=coincidence_note(medians, RATIO_TOLERANCE, width=80))
    ax.set_title('Local and refined bound over the global one, per test example\n(converged Lanczos estimates '
                 f'over the converged global product)\n{subtitle}', fontsize=10)
    fig.tight_layout()
    return fig


FIGURES = {
    'certified_accuracy': (certified_accuracy_figure, lambda runs: _with(runs, 'radius', 'radius')),
    'tightness': (tightness_figure, lambda runs: _with(runs, 'metrics', 'lip_ratio_median')
                  or _with(runs, 'radius', 'local_bound_eps')),
    'loss': (loss_figure, lambda runs: _with(runs, 'metrics', 'loss')),
    'varying': (varying_figure, lambda runs: [r for r in runs if r.metrics is not None
                                              and varying_columns(r.metrics)]),
    'empirical': (empirical_figure, lambda runs: _with(runs, 'lipschitz', 'certified_bound')),
}


def save_figure(fig, out_dir, stem):
    """Write ``stem``.png and ``stem``.pdf under ``out_dir``; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f'{stem}.{ext}') for ext in ('png', 'pdf')]
    for path in paths:
        fig.savefig(path, dpi=100)
    return paths


def make_figures(runs, out_dir):
    """Every figure some run has data for: (written paths, names of the figures skipped)."""
    written, skipped = [], []
    for stem, (draw, usable) in FIGURES.items():
        if not usable(runs):
            skipped.append(stem)
            continue
        fig = draw(runs)
        written += save_figure(fig, out_dir, stem)
        plt.close(fig)
    return written, skipped


def parse_args(argv=None):
    parser = utils.OneLineParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', nargs='+', required=True,
                        help='run prefixes P (reads P_metrics.csv, P_radius.csv, P_lipschitz.csv, P_args.json)')
    parser.add_argument('--names', nargs='+', help='legend names, one per run (default: basename of P)')
    parser.add_argument('--out', default='figures', help='output folder')
    args = parser.parse_args(argv)
    if args.names is not None and len(args.names) != len(args.runs):
        parser.error(f'--names has {len(args.names)} names for {len(args.runs)} runs')
    return args


def main(argv=None):
    args = parse_args(argv)
    names = args.names or [None] * len(args.runs)
    try:
        runs = [load_run(prefix, name) for prefix, name in zip(args.runs, names)]
    except (OSError, ValueError, KeyError) as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)
    written, skipped = make_figures(runs, args.out)
    for path in written:
        print(path)
    if skipped:
        print(f"skipped (no data in these runs): {', '.join(skipped)}", file=sys.stderr)
    return written


if __name__ == '__main__':
    main()
