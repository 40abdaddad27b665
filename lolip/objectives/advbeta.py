"""advbeta (robust self-training style mixing): CE(f(x), y) + beta * CE(f(x_adv), y), summed.

x_adv from the AT attack (train mode, 10 steps of eps/5, uniform start).
"""
import torch.nn.functional as F

from .adversarial import training_attack


def advbeta_loss(model, x, y, *, eps, norm, beta):
    """(sum CE(x) + beta * sum CE(x_adv), logits on x_adv)."""
    x_adv = training_attack(model, x, y, eps, norm)
    adv_logits = model(x_adv)
    loss = (F.cross_entropy(model(x), y, reduction='sum')
            + beta * F.cross_entropy(adv_logits, y, reduction='sum'))
    return loss, adv_logits
