"""``<prefix>_metrics.csv``: one row per finished epoch of a training run (``plots.py`` reads it)."""
import csv
import os


class MetricsCSV:
    """``<prefix>_metrics.csv``: one row per finished epoch (``plots.py`` reads it).

    Columns: ``METRIC_COLUMNS`` (``bound``: the bound of the run, local or refined, whose products
    the ``lip_local_*`` columns hold; with --bound global they hold the local one; ``lip_global`` the
    product of the global norms of the same kind, upper bounds or estimates as they are:
    ``evaluation.logged_global_product``; ``lip_ratio_median``: with ``--tightness N``, the median over the first N test
    examples of local / global from converged values, ``evaluation.converged_ratios``), then ``varying_<i>`` (mean fraction of varying neurons at
    activation layer i on the test pass) for every activation layer, then ``time`` (seconds).
    Bound columns stay empty in warm-up epochs. Opening it for a run that starts at epoch k keeps
    the rows of epochs before k and drops later ones, so ``--resume`` never duplicates a row.
    """

    def __init__(self, path, activation_layers, first_epoch):
        self.path = path
        self.columns = list(METRIC_COLUMNS) + [f'varying_{i}' for i in activation_layers] + ['time']
        kept = []
        if first_epoch > 0 and os.path.isfile(path):
            with open(path, newline='') as f:
                kept = [row for row in csv.DictReader(f) if int(row['epoch']) < first_epoch]
        tmp = f'{path}.tmp{os.getpid()}'
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval='', extrasaction='ignore')
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, path)

    def append(self, row):
        with open(self.path, 'a', newline='') as f:
            csv.DictWriter(f, fieldnames=self.columns, restval='', extrasaction='ignore').writerow(row)


METRIC_COLUMNS = ('epoch', 'eps', 'kappa', 'lr', 'loss', 'err', 'robust_loss', 'robust_err', 'test_eps',
                  'test_err', 'test_cert_err', 'bound', 'lip_local_median', 'lip_local_mean', 'lip_global',
                  'lip_ratio_median')


def metrics_row(epoch, eps, kappa, lr, stats, test_eps, test_err, cert_err, test, seconds, bound='local',
                ratios=None):
    """One MetricsCSV row (``test`` None in warm-up epochs: no bound columns; ``ratios``: the
    converged local / global ratios of ``--tightness``, or None)."""
    row = dict(epoch=epoch, eps=eps, kappa=kappa, lr=lr, loss=stats.loss, err=stats.error,
               test_eps=test_eps, test_err=test_err, time=round(seconds, 2),
               bound='local' if bound == 'global' else bound)
    if test is not None:
        lip = test.lipschitz.double()
        row.update(robust_loss=stats.robust_loss, robust_err=stats.robust_error, test_cert_err=cert_err,
                   lip_local_median=float(lip.median()) if len(lip) else '',
                   lip_local_mean=float(lip.mean()) if len(lip) else '', lip_global=test.global_lipschitz,
                   lip_ratio_median=float(ratios.median()) if ratios is not None and len(ratios) else '',
                   **{f'varying_{i}': fraction for i, fraction in test.varying.items()})
    return row
