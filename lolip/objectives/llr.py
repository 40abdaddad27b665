"""LLR, the local linearity regulariser (Qin et al. 2019), docs/method_lolip.md §2.

With l_i(x) the cross-entropy of example i, G_i = d l_i / d x_i and
g_i(delta) = | l_i(x + delta_i) - l_i(x) - <delta_i, G_i> |, the paper's loss is
    sum_i l_i(x) + lambda * sum_i g_i(delta) + mu * mean_i |<delta_i, G_i>|   (sllr: sum_i)
with delta the maximiser of sum_i g_i in the eps-ball.

``as_published=True`` reproduces the original code: the gradient it uses is always zero (it zeroes
the returned tensor in place) and g omits the -l(x) term, so the search maximises CE(x + delta)
and the loss is CE(x) + lambda * CE(x + delta) (the mu term is zero).
``as_published=False`` computes the paper's loss, with G differentiated (double backpropagation).

The inner search (model in eval mode) is the original's: start 0.001 N(0, 1), 2 steps of eps/2
along the gradient divided by its per-sample p-norm (a random direction where it is zero), then
clip x + delta to [0, 1] and rescale delta to p-norm at most eps. It is not PGD: under L-infinity
the step is grad / max|grad| (not its sign) and delta is rescaled (not clamped).
"""
import torch
import torch.nn.functional as F

import attacks
import norms

SEARCH_STEPS = 2


def linearity_gap(model, x, delta, y, clean_loss, grad, as_published):
    """Per example g_i(delta): |l_i(x + delta) - l_i(x) - <delta_i, G_i>| (published: |l_i(x+delta)|)."""
    shifted = F.cross_entropy(model(x + delta), y, reduction='none')
    if as_published:
        return shifted.abs()
    dot = (delta * grad).flatten(1).sum(1)
    return (shifted - clean_loss - dot).abs()


def input_gradient(model, x, y, *, create_graph):
    """(l_i(x) per example, G = d sum_i l_i / d x); published callers pass zeros instead of G."""
    x = x.detach().requires_grad_(True)
    losses = F.cross_entropy(model(x), y, reduction='none')
    grad, = torch.autograd.grad(losses.sum(), x, create_graph=create_graph)
    return losses, grad


def _direction(grad, norm):
    """grad divided by its per-sample p-norm; N(0, 1) where the gradient is zero."""
    lengths = norms.batch_norms(grad, norm)
    zero = lengths.flatten() == 0
    direction = grad / lengths.clamp_min(1e-30)
    direction[zero] = torch.randn_like(grad[zero])
    return direction


def llr_search(model, x, y, eps, norm, clean_loss, grad, as_published):
    """delta maximising sum_i g_i(delta), model in eval mode (the original's 2-step search)."""
    model.eval()
    delta = 0.001 * torch.randn_like(x)
    for _ in range(SEARCH_STEPS):
        delta.requires_grad_(True)
        gap = linearity_gap(model, x, delta, y, clean_loss, grad, as_published).sum()
        step, = torch.autograd.grad(gap, delta)
        with torch.no_grad():
            delta = delta + eps / 2 * _direction(step, norm)
            delta = (x + delta).clamp(0, 1) - x
            delta = delta.renorm(p=norm, dim=0, maxnorm=eps)
    return delta.detach()


def llr_loss_at(model, x, delta, y, *, lam, mu, summed, as_published):
    """(the LLR loss for a given delta, clean logits), model in train mode."""
    model.train()
    x = x.detach().requires_grad_(not as_published)
    logits = model(x)
    losses = F.cross_entropy(logits, y, reduction='none')
    if as_published:
        grad = torch.zeros_like(x)
    else:
        grad, = torch.autograd.grad(losses.sum(), x, create_graph=True)
    gap = linearity_gap(model, x, delta, y, losses, grad, as_published).sum()
    dots = (delta * grad).flatten(1).sum(1).abs()
    tangent = dots.sum() if summed else dots.mean()
    return losses.sum() + lam * gap + mu * tangent, logits


def llr_loss(model, x, y, *, eps, norm, lam, mu, summed, as_published):
    """The LLR objective: the search (eval mode), then llr_loss_at (train mode)."""
    norm = attacks.parse_norm(norm)
    model.eval()
    if as_published:
        clean_loss, grad = None, torch.zeros_like(x)
    else:
        clean_loss, grad = input_gradient(model, x, y, create_graph=False)
        clean_loss = clean_loss.detach()
    delta = llr_search(model, x, y, eps, norm, clean_loss, grad, as_published)
    return llr_loss_at(model, x, delta, y, lam=lam, mu=mu, summed=summed, as_published=as_published)
