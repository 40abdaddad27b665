"""Optimiser, learning rate, batch size, epochs and lr milestones (docs/method_lolip.md §7).

SGD without weight decay, lr divided by 10 at each milestone. The --model HYPER tokens
(``adam``, ``lrem2``, ``bs128``, ``ep70``, ``mo.9``, ``wd.9``) override the data set's defaults.
"""
from dataclasses import dataclass, replace

import torch


@dataclass
class Recipe:
    optimizer: str
    lr: float
    momentum: float
    batch_size: int
    epochs: int
    milestones: tuple
    weight_decay: float = 0.0


def _defaults(dataset, loss):
    """The data set's row of the table (the CIFAR-10/SVHN lr is 1e-3 for adv and llr losses)."""
    if dataset == 'mnist':
        return Recipe('sgd', 1e-4, 0.9, 64, 160, (40, 80, 120, 140))
    lr = 1e-3 if ('adv' in loss or 'llr' in loss) else 1e-2
    if dataset == 'cifar10':
        return Recipe('sgd', lr, 0.0, 64, 120, (40, 80, 100))
    if dataset == 'svhn':
        return Recipe('sgd', lr, 0.0, 64, 60, (30, 50))
    return Recipe('sgd', 1e-2, 0.0, 64, 70, (40, 60))


def recipe_for(dataset, spec):
    """The Recipe of a run: the data set's defaults, then the --model HYPER tokens."""
    return replace(_defaults(dataset, spec.loss), **spec.hyper)


def make_optimizer(recipe, parameters):
    """SGD (with momentum), Adam or NAdam over ``parameters``."""
    if recipe.optimizer == 'adam':
        return torch.optim.Adam(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == 'nadam':
        return torch.optim.NAdam(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(parameters, lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay)


def make_scheduler(recipe, optimizer):
    """lr x 0.1 at each milestone epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(recipe.milestones), gamma=0.1)
