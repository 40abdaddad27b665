"""Evaluation attacks by their --attack names."""
import functools

from .multitarget import multitarget_attack
from .pgd import pgd_attack


def build_attack(name, eps, norm, num_classes):
    """callable(model, x, y) -> x_adv for --attack pgd|multitarget."""
    if name == 'pgd':
        return functools.partial(pgd_attack, eps=eps, norm=norm)
    if name == 'multitarget':
        return functools.partial(multitarget_attack, eps=eps, norm=norm, num_classes=num_classes)
    raise ValueError(f'unknown attack {name!r}; expected pgd or multitarget')
