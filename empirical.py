"""Empirical local Lipschitzness (Yang et al. 2020; docs/method_lolip.md §4).

For one input x the measure is the ratio ``||f(x) - f(x')||_1 / ||x - x' + 1e-6||_p`` (f = the
logits, model in eval mode; 1e-6 added to every coordinate of ``x - x'`` inside the denominator's
norm, as in the original) at the end of a short search for the worst x' in the L-infinity eps-box
around x, inside [0, 1]. The search starts at ``x + 0.001 N(0, 1)`` and takes ``steps`` sign
steps of ``step`` on the ratio summed over the batch; after every step ``x' - x`` is clipped to
``[-eps, eps]`` and then ``x'`` to ``[0, 1]``. Only the last iterate is scored.

Two directions, named so that they cannot be mixed up:

* ``as_published=False`` (the definition, a maximum): steps go UP the ratio;
* ``as_published=True`` (what the original code computes): steps go DOWN the ratio, because it
  negates the ratio as a loss and then adds the sign of that loss's gradient.

The start noise. The descent's last iterate depends strongly on where it starts: on a trained MNIST
network one example's value varies by about 27% from one noise draw to the next (the maximum by
13%), so a data set's mean moves by several percent when the noise does. ``dataset_lipschitzness``
therefore draws it as the original does after ``torch.manual_seed(seed)``: float32 normal numbers
on the CPU, batch after batch in data order, from a stream of its own (``published_noise``) that
nothing else consumes, the same for both directions. The values then depend on ``seed`` alone, not
on the batch size, the device or whatever ran before (PGD starts, other searches).

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


def published_noise(seed):
    """A CPU generator whose normal draws are the start noise of the original code run after
    ``torch.manual_seed(seed)``: its DataLoader first takes one 64-bit base seed from the stream."""
    generator = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return generator


def _search(model, x, logits, eps, p, steps, step, as_published, generator):
    """The sign-step search; returns the last iterate (detached)."""
    direction = -1.0 if as_published else 1.0
    noise = torch.randn(x.shape, generator=generator)            # float32 on the CPU, as the original
    adv = x + START_NOISE * noise.to(device=x.device, dtype=x.dtype)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        ratio = lipschitz_ratio(logits, model(adv), x, adv, p).sum()
        grad, = torch.autograd.grad(ratio, adv)
        adv = _project(adv.detach() + direction * step * grad.sign(), x, eps)
    return adv.detach()


def search_points(model, x, eps, *, norm='inf', steps=10, step=0.003, as_published=False, generator=None):
    """The search of the module docstring on the batch ``x``: (ratio [B], last iterate x').

    ``eps``: half-width of the L-infinity box searched. ``norm``: the p of the denominator.
    ``as_published=True`` steps down the ratio as the original code does. ``generator``: where the
    start noise comes from (a CPU ``torch.Generator``, e.g. ``published_noise(seed)``; None: the
    global RNG). The model is put in eval mode for the search and left in the mode it came in.
    Parameters receive no gradient.
    """
    p = norms.order(norm)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            with torch.no_grad():
                logits = model(x)
            adv = _search(model, x, logits, eps, p, steps, step, as_published, generator)
        with torch.no_grad():
            return lipschitz_ratio(logits, model(adv), x, adv, p), adv
    finally:
        model.train(was_training)


def local_lipschitzness(model, x, eps, *, norm='inf', steps=10, step=0.003, as_published=False, generator=None):
    """Empirical local Lipschitzness of every example of the batch ``x``: a float tensor [B]
    (``search_points``' ratio)."""
    return search_points(model, x, eps, norm=norm, steps=steps, step=step, as_published=as_published,
                         generator=generator)[0]


def distances(x, adv, norm):
    """Per example ``||x - x'||_p`` (no shift): [B]."""
    return torch.linalg.vector_norm((x - adv).flatten(1), ord=norms.order(norm), dim=1)


def dataset_lipschitzness(model, loader, eps, *, norm='inf', device='cpu', steps=10, step=0.003,
                          certified=None, seed=0, progress=True):
    """Both directions over a loader of ``(x, y, index)`` (or ``(x, y)``) batches.

    Each direction draws its start noise from its own ``published_noise(seed)`` stream (module
    docstring). Returns ``{'lip_max': mean of the maximisation, 'lip_as_published': mean of the
    published descent, 'examples': count, 'eps', 'norm'}`` and, per example on the CPU in loader
    order, ``'index'``, ``'per_example_max'``, ``'per_example_as_published'``; with ``certified`` (a
    ``settings.BoundSettings``), also ``'per_example_certified'``: ``certified_ratio_bound`` at the
    smaller of the two searches' distances ``||x - x'||_p``, an upper bound of both ratios.
    """
    found = {'index': [], 'per_example_max': [], 'per_example_as_published': []}
    if certified is not None:
        found['per_example_certified'] = []
    streams = {'per_example_max': published_noise(seed), 'per_example_as_published': published_noise(seed)}
    seen = 0
    for batch in tqdm(loader, desc=f'local Lipschitzness eps={eps:g}', disable=not progress,
                      leave=False):
        x = batch[0].to(device)
        found['index'].append(batch[2].cpu() if len(batch) > 2 else torch.arange(seen, seen + len(x)))
        seen += len(x)
        nearest = None
        for key, generator in streams.items():
            ratio, adv = search_points(model, x, eps, norm=norm, steps=steps, step=step,
                                       as_published=key == 'per_example_as_published', generator=generator)
            found[key].append(ratio.cpu())
            apart = distances(x, adv, norm)
            nearest = apart if nearest is None else torch.minimum(nearest, apart)
        if certified is not None:
            found['per_example_certified'].append(certified_ratio_bound(
                model, x, eps, certified, norm=norm, index=found['index'][-1], distance=nearest).cpu())
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
def certified_ratio_bound(model, x, eps, settings=CERTIFIED, *, norm='inf', index=None, distance):
    """Per example, a certified upper bound on the empirical ratio (with its 1e-6 shift) at every x'
    of the L-infinity eps-box around x with ``||x - x'||_p >= distance``: [B] (inf where none is
    possible). ``distance``: a number or one per example, e.g. ``distances`` of the points scored.

    The box lies in the L2 ball of radius ``eps * sqrt(d)``, where the penultimate map h moves by at
    most ``L_local ||x - x'||_2`` (``local_bound.local_lipschitz`` at that radius: masked spectral
    norms, fixed neurons have zero slope in the ball). Then ``||f(x) - f(x')||_1 <= K ||x - x'||_2``
    with ``K = ||W_last||_{2->1} L_local`` (``two_to_one_norm``), and ``||x - x'||_2 <= c_p
    ||x - x'||_p`` with ``c_inf = sqrt(d)``, ``c_2 = c_1 = 1``. The shift can shrink the
    denominator: ``||x - x' + s 1||_p >= ||x - x'||_p - s d^(1/p)`` (s = 1e-6; ``x' = x + s 1``
    makes it 0, so no finite bound holds over the whole box). With ``r = ||x - x'||_p >= distance
    > s d^(1/p)`` the ratio is at most ``K c_p r / (r - s d^(1/p))``, which falls with r: the bound is
    ``K c_p / (1 - s d^(1/p) / distance)``. With guaranteed ``settings`` (the default) ``L_local``
    is an upper bound; with an estimate preset it is trusted to have converged.
    """
    p = norms.order(norm)
    dims = x[0].numel()
    local = local_bound.local_lipschitz(model, x, eps * math.sqrt(dims), settings, index=index)
    scale = math.sqrt(dims) if math.isinf(p) else 1.0
    shift = DENOMINATOR_SHIFT * (1.0 if math.isinf(p) else dims ** (1.0 / p))
    distance = torch.as_tensor(distance, dtype=torch.float64, device=local.device).expand(len(x))
    bound = two_to_one_norm(list(model)[-1].weight) * scale * local.double() / (1.0 - shift / distance)
    return torch.where(distance > shift, bound, torch.full_like(bound, math.inf))
