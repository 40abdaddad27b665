"""Certified radius of every example: the largest L2 eps at which ``local_bound.certify`` holds.

Search. Every example of a batch is first certified on a shared grid of eps values (``grid``
evenly spaced points up to ``eps_max``, plus ``anchors`` such as the evaluation eps and the
paper's radii): one bound pass over the whole batch per grid point. Each example's bracket is
then [last grid point before its first failure, first failure], and the brackets of all examples
are bisected together: at every step each example is certified at its own midpoint, in one
batched ``certify`` call with one eps per example, so masks are
recomputed at every probed eps. ``tol`` is relative to the radius: an example's bisection stops
once its upper end (not certified) is at most ``radius * (1 + tol)``, so the reported radius is
certified and ``(1 + tol) * radius`` is not (below ``eps_max * FLOOR`` the bracket is absolute:
an example not certified at any positive eps stops there). Misclassified examples get radius 0
and are certified at no radius (``correct`` False); examples still certified at ``eps_max`` get
radius ``eps_max`` (``capped``).

Failure budget. An example's radius is the largest eps that one of its certifications (every
grid point, then every bisection step) accepted, so with guaranteed settings it fails when any of
them does. ``certification_calls`` bounds their number up front from the grid, ``tol`` and the
floor (the bisection stops there), and each call gets ``failure_prob / calls``
(``per_call_settings``): the radius then fails with probability at most ``failure_prob``.

Monotonicity. Bisection assumes that an example certified at some eps is certified at every
smaller eps. The grid checks this: an example certified at a grid point above its first failure
is counted as non-monotone (``monotone`` False). Its radius is still the first crossing from
below, so it is never above a failure seen on the grid. Because the anchors are grid points, for
a monotone example ``radius >= t`` holds exactly when ``certify`` holds at anchor t.
"""
import csv
import math

import torch
from tqdm import tqdm

import local_bound
from settings import CERTIFIED

RADIUS_COLUMNS = ('index', 'label', 'prediction', 'correct', 'radius', 'bound', 'local_bound', 'local_bound_eps',
                  'global_bound')


def probe_grid(eps_max, grid, anchors=()):
    """Sorted float64 grid: ``eps_max * k / grid`` for k = 1..grid plus the anchors in (0, eps_max)."""
    if eps_max <= 0 or grid < 1:
        raise ValueError(f'need eps_max > 0 and grid >= 1 (got {eps_max}, {grid})')
    points = {eps_max * k / grid for k in range(1, grid + 1)}
    points.update(float(a) for a in anchors if 0 < a < eps_max)
    return torch.tensor(sorted(points), dtype=torch.float64)


# Brackets narrower than eps_max * FLOOR count as closed (radii near 0 have no relative precision).
FLOOR = 1e-6


def open_brackets(lower, upper, tol, floor):
    """Bool: the brackets [lower, upper] still wider than ``tol`` relative to ``lower`` (and than
    ``floor``); an infinite upper end (capped) is closed."""
    return torch.isfinite(upper) & (upper - lower > torch.clamp(tol * lower, min=floor))


def certification_calls(points, tol, floor):
    """The most ``certify`` calls one example takes part in: one per grid point, then the bisection
    of its bracket [p_(k-1), p_k], which halves it until it is at most ``max(tol * p_(k-1), floor)``
    wide (its lower end only grows), plus one halving for rounding; ``certified_radii`` stops there."""
    edges = [0.0] + points.tolist()
    halvings = 0
    for low, high in zip(edges[:-1], edges[1:]):
        stop = max(tol * low, floor)
        if high - low > stop:
            halvings = max(halvings, math.ceil(math.log2((high - low) / stop)) + 1)
    return len(points) + halvings


def per_call_settings(settings, calls):
    """``settings`` for each of ``calls`` certifications of one radius: guaranteed settings split
    their failure budget evenly (a union bound over the calls: the radius is the largest eps one of
    them certified), so that the radius fails with at most ``settings.failure_prob``."""
    return settings.replace(failure_prob=settings.failure_prob / calls) if settings.guaranteed else settings


def _certifier(model, x, y, settings, store, index):
    """``certify(rows, eps)``: the certificate of examples ``rows`` at ``eps`` (a number, or one
    per row), as a bool CPU tensor: one batched bound pass."""
    def certify(rows, eps):
        on_device = rows.to(x.device)
        subset = None if index is None else index[rows.to(index.device)]
        eps = eps.to(x.device) if torch.is_tensor(eps) else eps
        return local_bound.certify(model, x[on_device], y[on_device], eps, settings, store=store,
                                   index=subset).cpu()
    return certify


def _grid_brackets(table, correct, points):
    """From the grid certificates [B, G]: (lower end, upper end, first failure, monotone)."""
    count = table.size(1)
    table = table & correct.unsqueeze(1)
    failed = ~table
    first = torch.where(failed.any(1), failed.to(torch.uint8).argmax(1), torch.full_like(correct, count, dtype=torch.long))
    padded = torch.cat([points.new_zeros(1), points])
    lower = padded[first]
    upper = torch.where(first < count, points[first.clamp(max=count - 1)], torch.full_like(lower, math.inf))
    above = torch.arange(count).unsqueeze(0) > first.unsqueeze(1)
    monotone = ~(table & above).any(1)
    return lower, upper, first, monotone


@torch.no_grad()
def certified_radii(model, x, y, *, eps_max, settings=CERTIFIED, tol=1e-3, grid=8, anchors=(),
                    eval_eps=None, store=None, index=None):
    """Certified radius of every example of the batch, by batched bisection (module docstring).

    ``settings`` (default: guaranteed norms), ``store`` and ``index`` go to ``local_bound.certify``;
    with guaranteed settings each of the at most ``calls`` (``certification_calls``) certifications
    an example takes part in gets ``settings.failure_prob / calls`` (``per_call_settings``), so that
    its radius fails with probability at most ``settings.failure_prob``.
    Returns
    a dict of CPU tensors [B]: ``prediction``, ``correct``, ``radius`` (certified, float64),
    ``upper`` (smallest eps found not certified; inf when capped, 0 when misclassified),
    ``capped``, ``monotone``, ``local_bound`` (``local_bound.local_lipschitz`` at the radius, with
    ``settings``) and, when ``eval_eps`` is given, ``local_bound_eps`` (at ``eval_eps``); plus the
    numbers ``tol``, ``steps`` (bisection steps run), ``non_monotone`` (count of examples not
    monotone), ``calls`` and ``failure_prob`` (of each radius; None for estimates).
    """
    if not tol > 0:
        raise ValueError(f'tol must be positive, not {tol}')
    points = probe_grid(eps_max, grid, anchors)
    floor = eps_max * FLOOR
    calls = certification_calls(points, tol, floor)
    certify = _certifier(model, x, y, per_call_settings(settings, calls), store, index)
    logits = model(x)
    prediction = logits.argmax(1).cpu()
    correct = local_bound.correct_predictions(logits, y).cpu()
    everyone = torch.arange(len(y))
    table = torch.stack([certify(everyone, float(e)) for e in points], dim=1)
    lower, upper, first, monotone = _grid_brackets(table, correct, points)
    steps = 0
    while steps < calls - len(points):
        searching = (correct & open_brackets(lower, upper, tol, floor)).nonzero().squeeze(1)
        if not len(searching):
            break
        middle = (lower[searching] + upper[searching]) / 2
        ok = certify(searching, middle)
        lower[searching] = torch.where(ok, middle, lower[searching])
        upper[searching] = torch.where(ok, upper[searching], middle)
        steps += 1
    upper = torch.where(correct, upper, torch.zeros_like(upper))
    result = {'prediction': prediction, 'correct': correct, 'radius': lower, 'upper': upper,
              'capped': correct & (first == len(points)), 'monotone': monotone,
              'local_bound': local_bound.local_lipschitz(model, x, lower.to(x.device), settings,
                                                         index=index).cpu(),
              'tol': tol, 'steps': steps, 'non_monotone': int((~monotone).sum()), 'calls': calls,
              'failure_prob': settings.failure_prob if settings.guaranteed else None}
    if eval_eps is not None:
        result['local_bound_eps'] = local_bound.local_lipschitz(model, x, eval_eps, settings,
                                                                index=index).cpu()
    return result


def radius_rows(result, index, label, global_bound, bound='local'):
    """CSV rows (dicts keyed by ``RADIUS_COLUMNS``) of one ``certified_radii`` result; ``bound``
    names the bound (global, local or refined) of the ``radius`` and ``local_bound*`` columns. A
    misclassified example has radius 0 and ``correct`` 0: it is certified at no radius."""
    local_eps = result.get('local_bound_eps')
    rows = []
    for i in range(len(result['radius'])):
        rows.append({'index': int(index[i]), 'label': int(label[i]),
                     'prediction': int(result['prediction'][i]), 'correct': int(result['correct'][i]),
                     'radius': float(result['radius'][i]), 'bound': bound,
                     'local_bound': float(result['local_bound'][i]),
                     'local_bound_eps': '' if local_eps is None else float(local_eps[i]),
                     'global_bound': global_bound})
    return rows


def dataset_radii(model, loader, *, device, eps_max, settings=CERTIFIED, eval_eps=None, anchors=(),
                  global_bound=None, progress=True, store=None, **options):
    """``certified_radii`` over a loader of ``(x, y, index)`` batches.

    ``global_bound``: the value of the CSV's global_bound column (default ``local_bound.global_product``). ``options``:
    ``tol``, ``grid``. Returns (rows for
    ``write_radius_csv``, summary dict with ``examples``, ``non_monotone``, ``capped``, ``tol``,
    ``steps``, ``calls`` and ``failure_prob`` of the last batch's ``certified_radii``).
    """
    anchors = tuple(anchors) + ((eval_eps,) if eval_eps is not None else ())
    rows, summary = [], {'examples': 0, 'non_monotone': 0, 'capped': 0}
    for x, y, index in tqdm(loader, desc=f'certified radii (eps <= {eps_max:g})', disable=not progress,
                            leave=False):
        x, y = x.to(device), y.to(device)
        if global_bound is None:
            global_bound = local_bound.global_product(model, x.shape[1:], settings)
        result = certified_radii(model, x, y, eps_max=eps_max, settings=settings, eval_eps=eval_eps,
                                 anchors=anchors, store=store, index=index, **options)
        rows += radius_rows(result, index, y.cpu(), global_bound, settings.bound)
        summary['examples'] += len(y)
        summary['non_monotone'] += result['non_monotone']
        summary['capped'] += int(result['capped'].sum())
        summary.update(tol=result['tol'], steps=result['steps'], calls=result['calls'],
                       failure_prob=result['failure_prob'])
    return rows, summary


def write_radius_csv(path, rows):
    """Write ``rows`` (dicts keyed by ``RADIUS_COLUMNS``) with a header line."""
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=RADIUS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def certified_accuracy_at(radii, thresholds, correct):
    """``{t: fraction of examples certified at t}`` for every threshold t: correctly classified
    (``correct``, bool per example) with radius >= t; at t = 0 this is the clean accuracy."""
    radii = torch.as_tensor(radii, dtype=torch.float64)
    correct = torch.as_tensor(correct, dtype=torch.bool)
    return {t: float(((radii >= t) & correct).to(torch.float64).mean()) if len(radii) else 0.0
            for t in thresholds}
