"""Training objectives by the --model grammar's names; each returns (loss to backpropagate, logits).

All cross-entropies are summed over the batch. Zero the parameter gradients before calling one
(TULIP as published accumulates into them itself).
"""
import functools

from .adversarial import adversarial_loss
from .advbeta import advbeta_loss
from .llr import llr_loss
from .natural import natural_loss
from .trades import trades_loss
from .tulip import tulip_loss


def build_objective(spec, eps, norm, as_published):
    """callable(model, x, y) -> (loss, logits) for a parsed --model ``spec``."""
    params = spec.params
    if spec.objective == 'natural':
        return natural_loss
    if spec.objective == 'adv':
        return functools.partial(adversarial_loss, eps=eps, norm=norm)
    if spec.objective == 'advbeta':
        return functools.partial(advbeta_loss, eps=eps, norm=norm, **params)
    if spec.objective == 'trades':
        return functools.partial(trades_loss, eps=eps, norm=norm, **params)
    if spec.objective == 'llr':
        return functools.partial(llr_loss, eps=eps, norm=norm, as_published=as_published, **params)
    return functools.partial(tulip_loss, as_published=as_published, **params)
