"""Empirical local Lipschitzness (Yang et al. 2020; docs/method_lolip.md §4).

For one input x the measure is the ratio ``||f(x) - f(x')||_1 / ||x - x'||_p`` (f = the logits,
model in eval mode) at the end of a short search for the worst x' in the L-infinity eps-box
around x, inside [0, 1]. The search starts at ``x + 0.001 N(0, 1)`` and takes ``steps`` sign
steps of ``step`` on the ratio summed over the batch; after every step ``x' - x`` is clipped to
``[-eps, eps]`` and then ``x'`` to ``[0, 1]``. Only the last iterate is scored. As in the
original, 1e-6 is added to every coordinate of ``x - x'`` inside the denominator's norm.

Two directions, named so that they cannot be mixed up:

* ``as_published=False`` (the definition, a maximum): steps go UP the ratio;
* ``as_published=True`` (what the original code computes): steps go DOWN the ratio, because it
  negates the ratio as a loss and then adds the sign of that loss's gradient.

Norms. The search region is always the L-infinity eps-box; ``norm`` only picks the p of the
denominator (the attack norm of the original). For d input coordinates and any v,
``||v||_inf <= ||v||_2 <= sqrt(d) ||v||_inf`` and ``||v||_2 <= ||v||_1 <= sqrt(d) ||v||_2``, so
for the same x' the p = inf ratio is at least the p = 2 ratio, which is at least the p = 1 ratio.
The box of half-width eps lies inside the L2 ball of radius ``eps * sqrt(d)``; that is the radius
``certified_ratio_bound`` hands to the certified (L2) local bound.

Inputs are images in [0, 1] as the model sees them (no mean/std normalisation), as in both papers.
"""
import csv
import itertools
import math

import torch
from tqdm import tqdm

import local_bound
import norms
from settings import CERTIFIED

START_NOISE = 0.001
DENOMINATOR_SHIFT = 1e-6
MAX_ENUMERATED_CLASSES = 16


def lipschitz_ratio(logits, adv_logits, x, adv, p):
    """Per example ``||f(x) - f(x')||_1 / ||x - x' + 1e-6||_p``: [B]."""
    top = (logits - adv_logits).flatten(1).abs().sum(dim=1)
    bottom = torch.linalg.vector_norm((x - adv).flatten(1) + DENOMINATOR_SHIFT, ord=p, dim=1)
    return top / bottom


def _project(adv, x, eps):
    """Clip ``adv - x`` to ``[-eps, eps]``, then ``adv`` to ``[0, 1]``."""
    return torch.clamp(x + torch.clamp(adv - x, -eps, eps), 0.0, 1.0)


def _search(model, x, logits, eps, p, steps, step, as_published):
    """The sign-step search; returns the last iterate (detached)."""
    direction = -1.0 if as_published else 1.0
    adv = x + START_NOISE * torch.randn_like(x)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        ratio = lipschitz_ratio(logits, model(adv), x, adv, p).sum()
        grad, = torch.autograd.grad(ratio, adv)
        adv = _project(adv.detach() + direction * step * grad.sign(), x, eps)
    return adv.detach()


def local_lipschitzness(model, x, eps, *, norm='inf', steps=10, step=0.003, as_published=False):
    """Empirical local Lipschitzness of every example of the batch ``x``: a float tensor [B].

    ``eps``: half-width of the L-infinity box searched. ``norm``: the p of the denominator.
    ``as_published=True`` steps down the ratio as the original code does (see the module
    docstring). The model is put in eval mode for the search and left in the mode it came in.
    Parameters receive no gradient. Uses the global torch RNG for the start.
    """
    p = norms.order(norm)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            with torch.no_grad():
                logits = model(x)
            adv = _search(model, x, logits, eps, p, steps, step, as_published)
        with torch.no_grad():
            return lipschitz_ratio(logits, model(adv), x, adv, p)
    finally:
        model.train(was_training)


def dataset_lipschitzness(model, loader, eps, *, norm='inf', device='cpu', steps=10, step=0.003,
                          certified=None, progress=True):
    """Both directions over a loader of ``(x, y, index)`` (or ``(x, y)``) batches.

    Returns ``{'lip_max': mean of the maximisation, 'lip_as_published': mean of the published
    descent, 'examples': count, 'eps', 'norm'}`` and, per example on the CPU in loader order,
    ``'index'``, ``'per_example_max'``, ``'per_example_as_published'``; with ``certified`` (a
    ``settings.BoundSettings``), also ``'per_example_certified'`` (``certified_ratio_bound``).
    """
    found = {'index': [], 'per_example_max': [], 'per_example_as_published': []}
    if certified is not None:
        found['per_example_certified'] = []
    seen = 0
    for batch in tqdm(loader, desc=f'local Lipschitzness eps={eps:g}', disable=not progress,
                      leave=False):
        x = batch[0].to(device)
        found['index'].append(batch[2].cpu() if len(batch) > 2 else torch.arange(seen, seen + len(x)))
        seen += len(x)
        for key, published in (('per_example_max', False), ('per_example_as_published', True)):
            found[key].append(local_lipschitzness(model, x, eps, norm=norm, steps=steps, step=step,
                                                  as_published=published).cpu())
        if certified is not None:
            found['per_example_certified'].append(
                certified_ratio_bound(model, x, eps, certified, norm=norm, index=found['index'][-1]).cpu())
    result = {key: torch.cat(parts) for key, parts in found.items()}
    result.update(lip_max=float(result['per_example_max'].mean()),
                  lip_as_published=float(result['per_example_as_published'].mean()),
                  examples=seen, eps=eps, norm=str(norm))
    return result


LIPSCHITZ_COLUMNS = ('index', 'eps', 'norm', 'lip_max', 'lip_as_published', 'certified_bound')


def write_lipschitzness_csv(path, result):
    """One row per example of a ``dataset_lipschitzness`` result (certified_bound empty if absent)."""
    certified = result.get('per_example_certified')
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(LIPSCHITZ_COLUMNS)
        for i in range(result['examples']):
            writer.writerow([int(result['index'][i]), result['eps'], result['norm'],
                             float(result['per_example_max'][i]), float(result['per_example_as_published'][i]),
                             '' if certified is None else float(certified[i])])


def two_to_one_norm(weight):
    """An upper bound on ``max ||W v||_1 / ||v||_2`` for the last layer's weight W [C, h].

    ``||W v||_1 = max over sign vectors s of <W^T s, v>``, so the exact value is the largest
    ``||W^T s||_2``: enumerated for C <= 16 classes. For more classes the smaller of
    ``sqrt(C) ||W||_2`` and ``sum_i ||W_i||_2`` (both upper bounds) is returned.
    """
    classes = weight.size(0)
    if classes <= MAX_ENUMERATED_CLASSES:
        signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=classes)),
                             dtype=weight.dtype, device=weight.device)
        return float((signs.double() @ weight.double()).norm(dim=1).max()) * (1 + 1e-9)
    spectral = float(torch.linalg.matrix_norm(weight, ord=2))
    return min(math.sqrt(classes) * spectral, float(weight.norm(dim=1).sum()))


@torch.no_grad()
def certified_ratio_bound(model, x, eps, settings=CERTIFIED, *, norm='inf', index=None):
    """Per example, a certified upper bound on the empirical ratio over the L-infinity eps-box: [B].

    The box lies in the L2 ball of radius ``eps * sqrt(d)``, where the penultimate map h moves by at
    most ``L_local ||x - x'||_2`` (``local_bound.local_lipschitz`` at that radius: masked spectral
    norms, fixed neurons have zero slope in the ball). Then ``||f(x) - f(x')||_1 <=
    ||W_last||_{2->1} L_local ||x - x'||_2`` and ``||x - x'||_2 <= c_p ||x - x'||_p`` with
    ``c_inf = sqrt(d)``, ``c_2 = c_1 = 1``. The bound is ``||W_last||_{2->1} * L_local * c_p``
    (``two_to_one_norm``). It ignores the 1e-6 shift of the empirical denominator (a relative
    change of order 1e-6 / |x - x'|). With guaranteed ``settings`` (the default) ``L_local`` is an
    upper bound; with an estimate preset it is trusted to have converged.
    """
    p = norms.order(norm)
    dims = x[0].numel()
    local = local_bound.local_lipschitz(model, x, eps * math.sqrt(dims), settings, index=index)
    scale = math.sqrt(dims) if math.isinf(p) else 1.0
    return two_to_one_norm(list(model)[-1].weight) * local * scale

