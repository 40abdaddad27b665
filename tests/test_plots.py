"""plots.py on the CSVs of two small synthetic runs: files written, plotted series equal the CSV values."""
import csv
import json

import numpy as np
import pytest

import plots

METRICS_HEADER = ['epoch', 'eps', 'kappa', 'lr', 'loss', 'err', 'robust_loss', 'robust_err', 'test_eps',
                  'test_err', 'test_cert_err', 'lip_local_median', 'lip_local_mean', 'lip_global',
                  'lip_ratio_median', 'varying_1', 'varying_3', 'varying_6', 'time']
RADIUS_HEADER = ['index', 'label', 'prediction', 'radius', 'local_bound', 'local_bound_eps', 'global_bound']


def write_run(folder, name, seed, bound):
    """A run of 6 epochs (the first 2 plain warm-up, empty bound cells) and 40 test examples."""
    rng = np.random.default_rng(seed)
    prefix = str(folder / f'{name}_relux')
    with open(prefix + '_metrics.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(METRICS_HEADER)
        for epoch in range(6):
            warm = epoch < 2
            cells = [''] * 10 if warm else [round(float(v), 6) for v in rng.uniform(0.1, 3.0, 6)] + \
                [round(float(v), 6) for v in rng.uniform(0, 1, 4)]
            writer.writerow([epoch, 0.0 if warm else 0.3 * epoch, 1.0, 1e-3, rng.uniform(0.1, 2.3),
                             rng.uniform(0, 1)] + cells[:2] + [0.3, rng.uniform(0, 1)] + cells[2:3]
                            + cells[3:6] + cells[6:10] + [12.5])
    global_bound = 40.0
    with open(prefix + '_radius.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(RADIUS_HEADER)
        for i in range(40):
            radius = 0.0 if i % 7 == 0 else float(rng.uniform(0, 2))
            writer.writerow([i, i % 10, i % 10, radius, rng.uniform(5, 40), rng.uniform(5, 40), global_bound])
    with open(prefix + '_lipschitz.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['index', 'eps', 'norm', 'lip_max', 'lip_as_published', 'certified_bound'])
        for i in range(40):
            certified = rng.uniform(50, 500)
            writer.writerow([i, 0.1, 2, certified * rng.uniform(0.01, 0.3), certified * rng.uniform(0.001, 0.01),
                             certified])
    with open(prefix + '_args.json', 'w') as f:
        json.dump({'model': 'relux', 'data': 'mnist', 'epsilon': 1.58, 'bound': bound}, f)
    return prefix


def columns(path):
    """CSV columns as float lists, read independently of plots.read_csv (empty cells skipped later)."""
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    return {c: [float(r[c]) if r[c] else None for r in rows] for c in rows[0]}


def line(ax, label):
    found = [ln for ln in ax.get_lines() if ln.get_label() == label or ln.get_label().startswith(label + ' (')]
    assert len(found) == 1, [ln.get_label() for ln in ax.get_lines()]
    return found[0]


@pytest.fixture
def two_runs(tmp_path):
    return [write_run(tmp_path, 'local', 0, 'local'), write_run(tmp_path, 'global', 1, 'global')]


def test_cli_writes_png_and_pdf(two_runs, tmp_path):
    out = tmp_path / 'figures'
    written = plots.main(['--runs', *two_runs, '--names', 'local', 'global', '--out', str(out)])
    for stem in plots.FIGURES:
        for ext in ('png', 'pdf'):
            path = out / f'{stem}.{ext}'
            assert str(path) in written and path.stat().st_size > 5000
        assert (out / f'{stem}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_certified_accuracy_curve_is_the_csv(two_runs):
    runs = [plots.load_run(p, n) for p, n in zip(two_runs, ['local', 'global'])]
    fig = plots.certified_accuracy_figure(runs)
    ax = fig.axes[0]
    for prefix, name in zip(two_runs, ['local', 'global']):
        radii = np.array(columns(prefix + '_radius.csv')['radius'])
        curve = line(ax, name)
        eps = curve.get_xdata()
        expected = [100 * np.mean(radii >= e) for e in eps]
        assert np.allclose(curve.get_ydata(), expected)
        assert curve.get_ydata()[0] == pytest.approx(100 * np.mean(radii >= 0))
    local, glob = line(ax, 'local'), line(ax, 'global')            # coinciding curves stay told apart
    assert (local.get_linestyle(), local.get_marker()) != (glob.get_linestyle(), glob.get_marker())
    fig.canvas.draw()                                               # the x label's extent is known after a draw
    legend = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
    assert legend.y1 <= ax.get_window_extent(fig.canvas.get_renderer()).y0     # below the axes: covers no curve
    assert legend.y1 <= ax.xaxis.label.get_window_extent(fig.canvas.get_renderer()).y0     # and below its label
    assert 'relux on mnist' in fig.axes[0].get_title() and '1.58' in fig.axes[0].get_title()


def test_tightness_loss_and_varying_series_are_the_csv(two_runs):
    runs = [plots.load_run(p, n) for p, n in zip(two_runs, ['local', 'global'])]
    tight, loss, varying = plots.tightness_figure(runs), plots.loss_figure(runs), plots.varying_figure(runs)
    for k, (prefix, name) in enumerate(zip(two_runs, ['local', 'global'])):
        m = columns(prefix + '_metrics.csv')
        bound_epochs = [e for e, v in zip(m['epoch'], m['lip_local_median']) if v is not None]
        assert bound_epochs == [2, 3, 4, 5]
        ratio = line(tight.axes[0], name)
        assert list(ratio.get_xdata()) == bound_epochs
        # like with like: the ratio of one test pass, never lip_local_median / lip_global
        assert np.allclose(ratio.get_ydata(), [v for v in m['lip_ratio_median'] if v is not None])
        r = columns(prefix + '_radius.csv')
        per_example = np.array(r['local_bound_eps']) / np.array(r['global_bound'])
        histogram = line(tight.axes[1], name)
        counts = histogram.get_ydata()[:-1]
        assert counts.sum() == 40
        assert np.array_equal(counts, np.histogram(per_example, bins=histogram.get_xdata())[0])
        assert f'median {np.median(per_example):.3f}' in histogram.get_label()
        clean, robust = line(loss.axes[0], name), line(loss.axes[1], name)
        assert np.allclose(clean.get_ydata(), m['loss'])
        assert np.allclose(robust.get_ydata(), [v for v in m['robust_loss'] if v is not None])
        panel = varying.axes[k]
        assert panel.get_title() == name
        for layer in (1, 3, 6):
            values = [v for v in m[f'varying_{layer}'] if v is not None]
            assert np.allclose(line(panel, f'layer {layer}').get_ydata(), values)


def test_empirical_points_are_the_csv(two_runs):
    runs = [plots.load_run(p, n) for p, n in zip(two_runs, ['local', 'global'])]
    fig = plots.empirical_figure(runs)
    ax = fig.axes[0]
    for prefix, name in zip(two_runs, ['local', 'global']):
        table = columns(prefix + '_lipschitz.csv')
        for label, column in (('maximum (ascent)', 'lip_max'), ('as published (descent)', 'lip_as_published')):
            points = line(ax, f'{name}: {label}')
            assert np.allclose(points.get_xdata(), table['certified_bound'])
            assert np.allclose(points.get_ydata(), table[column])
    assert 'p = 2, L-inf box eps 0.1' in ax.get_title()


def test_missing_files_end_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        plots.main(['--runs', str(tmp_path / 'nothing_relux')])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and 'nothing_relux_metrics.csv' in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as stop:
        plots.main(['--runs', 'a', 'b', '--names', 'one'])
    assert stop.value.code == 2 and '--names has 1 names for 2 runs' in capsys.readouterr().err


def test_a_run_with_only_a_radius_csv_makes_only_that_figure(tmp_path, capsys):
    prefix = write_run(tmp_path, 'eval', 2, 'local')
    (tmp_path / 'eval_relux_metrics.csv').unlink()
    (tmp_path / 'eval_relux_lipschitz.csv').unlink()
    written = plots.main(['--runs', prefix, '--out', str(tmp_path / 'out')])
    assert sorted(p.rsplit('/', 1)[1] for p in written) == ['certified_accuracy.pdf', 'certified_accuracy.png',
                                                          'tightness.pdf', 'tightness.png']
    assert 'skipped (no data in these runs): loss, varying, empirical' in capsys.readouterr().err


def test_read_csv_keeps_word_columns_and_the_curve_starts_at_clean_accuracy(tmp_path):
    """A radius CSV with the ``bound`` and ``correct`` columns: words stay strings, and the
    certified-accuracy curve at radius 0 is the clean accuracy (a misclassified example has radius 0
    and is certified at no radius)."""
    import numpy as np

    import plots
    path = tmp_path / 'run_radius.csv'
    path.write_text('index,label,prediction,correct,radius,bound,local_bound,local_bound_eps,global_bound\n'
                    '0,1,1,1,0.5,refined,2.0,2.0,4.0\n1,2,3,0,0.0,refined,1.0,1.0,4.0\n'
                    '2,0,0,1,0.2,refined,3.0,3.0,4.0\n3,4,4,1,0.0,refined,3.0,3.0,4.0\n')
    table = plots.read_csv(path)
    assert table['bound'].tolist() == ['refined'] * 4 and table['radius'].dtype.kind == 'f'
    curve = plots.certified_fraction(table['radius'], np.array([0.0, 0.1, 0.3]), plots.correct_column(table))
    assert curve.tolist() == [0.75, 0.5, 0.25]
    assert plots._with_bound('run', table) == 'run [refined bound]'


def test_curves_on_top_of_each_other_are_named_and_their_markers_differ(two_runs, tmp_path):
    """A run certified twice with the same radii draws two identical curves: the legend's title says
    so, and their markers fall on different radii (the one drawn last hides neither)."""
    copy = tmp_path / 'copy_relux'
    for ext in ('_radius.csv', '_args.json'):
        (tmp_path / f'copy_relux{ext}').write_bytes(open(two_runs[0] + ext, 'rb').read())
    runs = [plots.load_run(two_runs[0], 'local'), plots.load_run(two_runs[1], 'global'),
            plots.load_run(str(copy), 'again')]
    ax = plots.certified_accuracy_figure(runs).axes[0]
    title = ax.get_legend().get_title().get_text().replace('\n', ' ')
    assert 'identical' in title and 'local = again' in title and 'global' not in title
    first, again = line(ax, 'local'), line(ax, 'again')
    assert np.array_equal(first.get_ydata(), again.get_ydata())
    assert first.get_markevery()[0] != again.get_markevery()[0]
    assert plots.coincidence_note({'a': np.ones(3), 'b': np.ones(3) + 0.2}, 0.1) is None
    assert plots.coinciding({'a': np.ones(3), 'b': np.ones(3) + 0.05, 'c': np.zeros(3)}, 0.1) == [['a', 'b']]


def test_tightness_histogram_does_not_magnify_tiny_differences(tmp_path):
    """Ratios all within 1e-4 of 1 (every neuron varies): the bins span RATIO_MIN_SPAN, the x axis has
    no offset, and identical histograms are named."""
    prefixes = []
    for name in ('a', 'b'):
        prefix = write_run(tmp_path, name, 3, 'local')
        rows = list(csv.DictReader(open(prefix + '_radius.csv')))
        for row in rows:
            row['local_bound_eps'], row['global_bound'] = 4.0, 4.0002
        with open(prefix + '_radius.csv', 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        prefixes.append(prefix)
    fig = plots.tightness_figure([plots.load_run(p, n) for p, n in zip(prefixes, 'ab')])
    spread = fig.axes[1]
    edges = line(spread, 'a').get_xdata()
    width = plots.RATIO_MIN_SPAN / plots.HISTOGRAM_BINS
    assert edges[-1] - edges[0] >= plots.RATIO_MIN_SPAN - 1e-12 and np.allclose(np.diff(edges), width)
    assert np.allclose(edges / width, np.round(edges / width))          # 1.0 is a bin edge
    assert line(spread, 'a').get_ydata()[np.searchsorted(edges, 4.0 / 4.0002) - 1] == 40
    fig.canvas.draw()
    assert spread.xaxis.get_major_formatter().get_offset() == ''
    assert 'identical' in spread.get_legend().get_title().get_text()


def test_bound_ratio_figure_is_the_rows(tmp_path):
    rng = np.random.default_rng(4)
    ratios = {f'{t}-trained': [{'eps': e, 'bound': b, 'index': i, 'ratio': float(rng.uniform(0.6, 1.0))}
                               for e in (0.1, 0.2, 0.4) for b in ('local', 'refined') for i in range(20)]
              for t in ('global', 'local')}
    fig = plots.bound_ratio_figure(ratios, 'relux on mnist, 20 held-out images')
    ax = fig.axes[0]
    for trained, rows in ratios.items():
        for bound in ('local', 'refined'):
            curve = line(ax, f'{trained}, {bound} bound')
            assert list(curve.get_xdata()) == [0.1, 0.2, 0.4]
            expected = [np.median([r['ratio'] for r in rows if r['bound'] == bound and r['eps'] == e])
                        for e in (0.1, 0.2, 0.4)]
            assert np.allclose(curve.get_ydata(), expected)
    assert line(ax, 'global-trained, local bound').get_marker() != line(ax, 'global-trained, refined bound').get_marker()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert ax.get_legend().get_window_extent(renderer).y1 <= ax.xaxis.label.get_window_extent(renderer).y0
    assert 'estimates' in ax.get_title() and '20 held-out images' in ax.get_title()
