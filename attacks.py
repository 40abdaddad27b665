"""Adversarial attacks: one projected gradient method for L2 and L-infinity balls, its
multi-targeted form, and random sampling in the ball.

Every function leaves ``model.train()``/``eval()`` as it found it: the caller chooses the mode
(evaluation attacks run in eval mode, adversarial training attacks in train mode).
"""
import math

import torch
import torch.nn.functional as F

import norms
from norms import batch_norms

RANDOM_STARTS = (None, 'uniform', 'normal', 'image')
ORDERS = ('project_clip', 'clip_project')


def parse_norm(norm):
    """2.0 or math.inf from 2, 'inf', float('inf'), '2', 'l2', 'linf' (``norms.order``: the attacks
    work in L2 and L-infinity)."""
    return norms.order(norm, allowed=(2.0, math.inf))


def _per_sample(values, like):
    """Per-sample ``values`` [B] shaped to broadcast against ``like``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def project(delta, eps, norm):
    """``delta`` moved to the nearest point of the eps-ball (L2: rescaled; L-infinity: clamped)."""
    if norm == math.inf:
        return delta.clamp(-eps, eps)
    return delta * (eps / batch_norms(delta, 2).clamp_min(1e-12)).clamp(max=1.0)


def random_in_ball(x, eps, norm):
    """One uniform sample of the eps-ball around 0 per example, shaped like ``x``."""
    if norm == math.inf:
        return (2 * torch.rand_like(x) - 1) * eps
    direction = torch.randn_like(x)
    direction = direction / batch_norms(direction, 2).clamp_min(1e-12)
    radius = eps * torch.rand(x.size(0), device=x.device, dtype=x.dtype) ** (1.0 / x[0].numel())
    return direction * _per_sample(radius, x)


def _start(x, eps, norm, random_start, clip):
    """The initial perturbation: none, uniform in the ball, 0.001 N(0, 1), or (the authors'
    advertorch start) a uniform image in the clip range minus x, projected onto the ball."""
    if random_start is None:
        return torch.zeros_like(x)
    if random_start == 'uniform':
        delta = random_in_ball(x, eps, norm)
    elif random_start == 'normal':
        delta = 0.001 * torch.randn_like(x)
    else:
        delta = project(torch.empty_like(x).uniform_(*clip) - x, eps, norm)
    return _clipped(x, delta, clip)


def _clipped(x, delta, clip):
    return delta if clip is None else (x + delta).clamp(*clip) - x


def _step_direction(grad, norm):
    if norm == math.inf:
        return grad.sign()
    return grad / batch_norms(grad, 2).clamp_min(1e-12)


def _objective(model, x_adv, x, y, loss, targets, reduction):
    """The scalar the attack climbs: CE to ``y`` (or minus CE to ``targets``), or ``loss(...)``."""
    if callable(loss):
        return loss(model, x_adv, x, y)
    logits = model(x_adv)
    if targets is not None:
        return -F.cross_entropy(logits, targets, reduction=reduction)
    return F.cross_entropy(logits, y, reduction=reduction)


def _run(model, x, y, eps, norm, steps, step_size, random_start, order, loss, targets, clip, reduction):
    delta = _start(x, eps, norm, random_start, clip)
    for _ in range(steps):
        delta.requires_grad_(True)
        objective = _objective(model, x + delta, x, y, loss, targets, reduction)
        grad, = torch.autograd.grad(objective, delta)
        with torch.no_grad():
            delta = delta + step_size * _step_direction(grad, norm)
            if order == 'project_clip':
                delta = _clipped(x, project(delta, eps, norm), clip)
            else:
                delta = project(_clipped(x, delta, clip), eps, norm)
    return (x + delta).detach()


def pgd(model, x, y, eps, *, norm=2, steps=10, step_size=None, random_start='uniform',
        order='project_clip', loss='ce', targets=None, restarts=1, clip=(0.0, 1.0), reduction='sum'):
    """Projected gradient ascent in the ``norm`` eps-ball around ``x``; returns the adversarial inputs.

    Each step moves ``step_size`` (default eps/4) along the gradient's sign (L-infinity) or its
    per-sample normalised direction (L2), then projects onto the ball and clips to ``clip``
    (``order='project_clip'``), or clips then projects (``'clip_project'``, advertorch's order,
    the authors'). ``loss``: 'ce' maximises the cross-entropy of ``y`` (with ``targets``, minimises
    that of the targets), or a callable ``loss(model, x_adv, x, y)`` returning the scalar to climb.
    With several restarts an example keeps the first restart that succeeds (misclassified, or the
    target reached), else the last one.
    """
    norm = parse_norm(norm)
    if random_start not in RANDOM_STARTS:
        raise ValueError(f'random_start must be one of {RANDOM_STARTS}, not {random_start!r}')
    if order not in ORDERS:
        raise ValueError(f'order must be one of {ORDERS}, not {order!r}')
    step_size = eps / 4 if step_size is None else step_size
    best = x.detach().clone()
    done = torch.zeros(x.size(0), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        adv = _run(model, x.detach(), y, eps, norm, steps, step_size, random_start, order, loss,
                   targets, clip, reduction)
        best[~done] = adv[~done]
        with torch.no_grad():
            prediction = model(adv).argmax(1)
        done |= prediction == targets if targets is not None else prediction != y
    return best


def multitarget_pgd(model, x, y, eps, *, norm=2, steps=20, step_size=None, num_classes=None,
                    random_start='uniform', order='project_clip', clip=(0.0, 1.0)):
    """Targeted PGD towards every class j != y; keeps per example the j with the best score
    ``p_j(x_adv_j) - p_y(x)`` (softmax probabilities). Step size defaults to eps/10."""
    step_size = eps / 10 if step_size is None else step_size
    with torch.no_grad():
        clean = F.softmax(model(x), dim=1)
    num_classes = clean.size(1) if num_classes is None else num_classes
    p_label = clean.gather(1, y.view(-1, 1)).squeeze(1)
    best = x.detach().clone()
    best_score = torch.full((x.size(0),), -math.inf, device=x.device)
    for j in range(num_classes):
        target = torch.full_like(y, j)
        adv = pgd(model, x, y, eps, norm=norm, steps=steps, step_size=step_size,
                  random_start=random_start, order=order, targets=target, clip=clip)
        with torch.no_grad():
            score = F.softmax(model(adv), dim=1)[:, j] - p_label
        better = (score > best_score) & (y != j)
        best[better] = adv[better]
        best_score = torch.where(better, score, best_score)
    return best


def margins(model, x, y):
    """Per example ``z_y - max_{j != y} z_j`` of the logits (NaN logits give NaN)."""
    with torch.no_grad():
        logits = model(x)
    own = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, y.view(-1, 1), -math.inf).max(dim=1).values
    return own - others


def random_search(model, x, y, eps, *, norm=2, samples=100, clip=(0.0, 1.0)):
    """The smallest logit margin over ``samples`` uniform points of the ball (clipped); returns
    (points [B, ...], margins [B])."""
    best, best_margin = x.detach().clone(), margins(model, x, y)
    norm = parse_norm(norm)
    for _ in range(samples):
        candidate = x + _clipped(x, random_in_ball(x, eps, norm), clip)
        margin = margins(model, candidate, y)
        lower = margin < best_margin
        best[lower] = candidate[lower]
        best_margin = torch.where(lower, margin, best_margin)
    return best, best_margin
