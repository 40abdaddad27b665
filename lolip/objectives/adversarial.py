"""Adversarial training (Madry et al.): sum_i CE(f(x_adv_i), y_i).

x_adv: PGD with 10 steps of eps/5 from a uniform random start, run with the model in TRAIN mode
(batch-norm statistics move during the attack, as in the original).
"""
import torch.nn.functional as F

import attacks


def training_attack(model, x, y, eps, norm):
    """The AT/advbeta inner maximisation, in train mode."""
    model.train()
    return attacks.pgd(model, x, y, eps, norm=norm, steps=10, step_size=eps / 5,
                       random_start='uniform', order='project_clip', reduction='mean')


def adversarial_loss(model, x, y, *, eps, norm):
    """(sum_i CE(f(x_adv_i), y_i), logits on x_adv)."""
    x_adv = training_attack(model, x, y, eps, norm)
    logits = model(x_adv)
    return F.cross_entropy(logits, y, reduction='sum'), logits
