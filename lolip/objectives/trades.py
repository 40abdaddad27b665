"""TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(p(x) || p(x')) (docs/method_lolip.md §2).

x' maximises sum_i KL(p(x_i) || p(x'_i)) with the model in EVAL mode: start x + 0.001 N(0, 1)
(clipped to [0, 1]; the original clips only after the first step),
K sign steps of 2 eps / K (L-infinity: project to the eps-box, then clip to [0, 1]; the L2 variant
takes normalised-gradient steps, clips, then rescales into the ball). The loss, in train mode, is
sum CE + beta * KL_sum (``strades``) or sum CE + beta * KL_sum / B (plain ``trades``); its gradient
flows through p(x) and p(x'). One clean forward serves both terms.
"""
import math

import torch.nn.functional as F

import attacks


def kl_sum(clean_logits, adv_logits):
    """sum_i KL(softmax(clean_i) || softmax(adv_i))."""
    return F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(clean_logits, dim=1),
                    reduction='sum')


def trades_attack(model, x, y, eps, norm, steps):
    """The KL maximisation in eval mode; the model is left in train mode."""
    model.eval()
    clean = model(x).detach()
    adv = attacks.pgd(model, x, y, eps, norm=norm, steps=steps, step_size=2 * eps / steps,
                      random_start='normal',
                      order='project_clip' if norm == math.inf else 'clip_project',
                      loss=lambda net, x_adv, _x, _y: kl_sum(clean, net(x_adv)))
    model.train()
    return adv


def trades_loss_at(model, x, x_adv, y, *, beta, summed):
    """(CE_sum(x) + beta * KL_sum [/ B], clean logits) for a given x_adv, in train mode."""
    model.train()
    logits = model(x)
    kl = kl_sum(logits, model(x_adv))
    if not summed:
        kl = kl / x.size(0)
    return F.cross_entropy(logits, y, reduction='sum') + beta * kl, logits


def trades_loss(model, x, y, *, eps, norm, beta, steps, summed):
    """The TRADES objective: attack, then trades_loss_at."""
    x_adv = trades_attack(model, x, y, eps, attacks.parse_norm(norm), steps)
    return trades_loss_at(model, x, x_adv, y, beta=beta, summed=summed)
