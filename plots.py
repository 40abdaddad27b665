"""Figures of one or several runs, from the CSVs that training and evaluation write.

    python plots.py --runs pretrained/local_relux pretrained/global_relux --names local global --out figures/

For every run prefix P it reads ``P_metrics.csv`` (one row per epoch, written by training),
``P_radius.csv`` (one row per test example, ``evaluate.py --radius``), ``P_lipschitz.csv`` (one
row per test example, ``empirical.write_lipschitzness_csv``) and ``P_args.json`` (the flags, for
titles); a run needs at least one of the CSVs. It writes, as PNG and PDF, the figures it has data
for:

* ``certified_accuracy``: certified accuracy against the L2 radius, one curve per run;
* ``tightness``: median local / global Lipschitz bound over training, and its histogram over
  the test examples at the evaluation eps;
* ``loss``: clean and robust training loss over the epochs, one curve per run;
* ``varying``: fraction of varying (not fixed) neurons per activation layer over training;
* ``empirical``: empirical local Lipschitzness (both search directions) of every test example
  against its certified bound on the same ratio.

Every figure function returns its matplotlib Figure; the plotted series are the CSV values.
"""
import argparse
import csv
import json
import os
import sys
from dataclasses import dataclass, field

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

HISTOGRAM_BINS = 30
CURVE_POINTS = 201


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


def _bin_edges(values):
    """HISTOGRAM_BINS equal bins over the range of ``values`` (widened a little when they are all equal)."""
    low, high = float(values.min()), float(values.max())
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


def certified_accuracy_figure(runs):
    """Certified accuracy (%) against the L2 radius, one curve per run with a radius CSV."""
    runs = _with(runs, 'radius', 'radius')
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    top = max(float(np.nanmax(run.radius['radius'])) for run in runs) if runs else 1.0
    eps = np.linspace(0.0, 1.05 * top if top > 0 else 1.0, CURVE_POINTS)
    for run in runs:
        radii = run.radius['radius']
        ax.plot(eps, 100 * certified_fraction(radii, eps, correct_column(run.radius)),
                label=f'{run.name} ({len(radii)} examples)')
    for value in sorted({run.args['epsilon'] for run in runs if 'epsilon' in run.args}):
        ax.axvline(value, color='grey', linestyle=':', linewidth=1)
        ax.annotate(f'eval eps {value:.3g}', (value, 100), xytext=(3, -12), textcoords='offset points',
                    fontsize=8, color='grey')
    ax.set_xlabel('L2 radius eps (input units; pixels in [0, 1])')
    ax.set_ylabel('certified accuracy (% of test examples)')
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f'Certified accuracy vs radius\n{describe(runs)}', fontsize=10)
    fig.tight_layout()
    return fig


def _with_bound(name, table):
    """``name``, with the bound of a CSV's ``bound`` column when it is not the paper's local one."""
    bounds = set(table['bound']) if 'bound' in table and table['bound'].dtype.kind in 'US' else set()
    extra = sorted(bounds - {'local', ''})
    return f"{name} [{', '.join(extra)} bound]" if extra and extra[0] not in name else name


def tightness_figure(runs):
    """Local / global bound: median over the test pass per epoch (left), per test example (right);
    each ratio is of two bounds of one kind (both guaranteed upper bounds, or both estimates)."""
    fig, (over_time, spread) = plt.subplots(1, 2, figsize=(11, 4.2))
    trained = [r for r in _with(runs, 'metrics', 'lip_local_median') if 'lip_global' in r.metrics]
    for run in trained:
        m = run.metrics
        over_time.plot(*_finite(m['epoch'], m['lip_local_median'] / m['lip_global']), marker='.',
                       label=_with_bound(run.name, m))
    over_time.axhline(1.0, color='grey', linestyle=':', linewidth=1)
    _epoch_axis(over_time)
    over_time.set_ylabel('median local (or refined) / global bound\n(ratio, 1 = no gain)')
    over_time.set_title('during training (test pass)', fontsize=10)
    over_time.grid(alpha=0.3)
    evaluated = [r for r in _with(runs, 'radius', 'local_bound_eps') if 'global_bound' in r.radius]
    ratios = {_with_bound(run.name, run.radius): _finite_values(run.radius['local_bound_eps'] / run.radius['global_bound'])
              for run in evaluated}
    if ratios:
        edges = _bin_edges(np.concatenate(list(ratios.values())))
        for name, ratio in ratios.items():
            counts, _ = np.histogram(ratio, bins=edges)
            spread.plot(edges, np.append(counts, counts[-1]), drawstyle='steps-post',
                        label=f'{name} (median {np.median(ratio):.3f})')
    if ratios:
        spread.axvline(1.0, color='grey', linestyle=':', linewidth=1)
    spread.set_xlabel('local (or refined) / global bound at the evaluation eps (ratio)')
    spread.set_ylabel('test examples (count per bin)')
    spread.set_title('after training, per test example', fontsize=10)
    spread.grid(alpha=0.3)
    _legend_or_note(over_time, 'no per-epoch bounds\n(metrics CSV: lip_local_median)')
    _legend_or_note(spread, 'no per-example bounds\n(radius CSV: local_bound_eps)')
    fig.suptitle(f'Tightness of the local Lipschitz bound\n{describe(runs)}', fontsize=10)
    fig.tight_layout()
    return fig


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
    fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(5.5 * max(1, len(runs)), 4.2), sharey=True,
                             squeeze=False)
    for ax, run in zip(axes[0], runs):
        for column in varying_columns(run.metrics):
            ax.plot(*_finite(run.metrics['epoch'], run.metrics[column]), marker='.',
                    label=f"layer {column.split('_')[1]}")
        ax.set_title(run.name, fontsize=10)
        _epoch_axis(ax)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(title='activation (module index)', fontsize=8)
    axes[0][0].set_ylabel('varying neurons (fraction of the layer, test pass)')
    fig.suptitle(f'Neurons that can change inside the eps-ball\n{describe(runs)}', fontsize=10)
    fig.tight_layout()
    return fig


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


FIGURES = {
    'certified_accuracy': (certified_accuracy_figure, lambda runs: _with(runs, 'radius', 'radius')),
    'tightness': (tightness_figure, lambda runs: _with(runs, 'metrics', 'lip_local_median')
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
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runs', nargs='+', required=True,
                        help='run prefixes P (reads P_metrics.csv, P_radius.csv, P_lipschitz.csv, P_args.json)')
    parser.add_argument('--names', nargs='+', help='legend names, one per run (default: basename of P)')
    parser.add_argument('--out', default='figures', help='output folder (default: figures)')
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
