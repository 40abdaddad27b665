"""TULIP / GR, the finite-difference gradient regulariser (Finlay & Oberman 2019).

With l_i the cross-entropy of example i and v_i = g_i / ||g_i||_2 the L2-normalised input gradient
(a constant: not differentiated), the loss is
    sum_i l_i(x) + (lambda / 2) * sum_i ((l_i(x + h v_i) - l_i(x)) / h)^2
in train mode. ``as_published=True`` reproduces the original: the backward pass that computes v
also accumulates into the parameter gradients, so the parameters receive
2 * grad CE + lambda * grad penalty (the reported loss value is the same in both modes).
The caller must zero the parameter gradients before calling ``tulip_loss``.
"""
import torch
import torch.nn.functional as F


def unit_direction(grad):
    """Per-sample L2-normalised ``grad`` (zero rows stay zero)."""
    norms = grad.flatten(1).norm(dim=1).view(-1, *([1] * (grad.dim() - 1)))
    return torch.where(norms > 0, grad / norms.clamp_min(1e-30), torch.zeros_like(grad))


def tulip_penalty(model, x, y, losses, v, step):
    """sum_i ((l_i(x + h v_i) - l_i(x)) / h)^2 / 2."""
    shifted = F.cross_entropy(model(x + step * v), y, reduction='none')
    return ((shifted - losses) / step).pow(2).sum() / 2


def tulip_loss(model, x, y, *, lam, step, as_published):
    """(CE_sum + lambda * penalty, logits); published: CE's gradient also lands in .grad once."""
    model.train()
    x = x.detach().requires_grad_(True)
    logits = model(x)
    losses = F.cross_entropy(logits, y, reduction='none')
    if as_published:
        losses.sum().backward(retain_graph=True)
        grad = x.grad
    else:
        grad, = torch.autograd.grad(losses.sum(), x, retain_graph=True)
    v = unit_direction(grad.detach())
    penalty = tulip_penalty(model, x.detach(), y, losses, v, step)
    return losses.sum() + lam * penalty, logits
