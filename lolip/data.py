"""The data sets of the original (docs/method_lolip.md §5), all in [0, 1] without normalisation.

``mnist``, ``cifar10`` (``aug01``: random crop 32 with padding 4 + flip), ``svhn`` (train + test,
no extra) and ``resImgnet112v3`` (Restricted ImageNet, 64x64, built by
``lolip.prepare_restricted_imagenet``), all through ``data_load``.
"""
from dataclasses import dataclass

import data_load
import loaders

DATASETS = ('mnist', 'cifar10', 'svhn', 'resImgnet112v3')     # the ones of the original's grammar


@dataclass
class Data:
    train: object
    train_eval: object  # the training images without augmentation, for the report
    test: object
    num_classes: int
    shape: tuple


def load(name, data_dir, *, aug=None, limit_train=None, limit_test=None, download=False):
    """Data of ``name`` (first ``limit_*`` examples of each split); DataNotFoundError if absent."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    spec = data_load.dataset(name)
    train, test = spec.build(data_dir, _augments(name, aug), False, download)
    train_eval = spec.build(data_dir, False, False, download)[0] if _augments(name, aug) else train
    return Data(loaders.limited(train, limit_train), loaders.limited(train_eval, limit_train),
                loaders.limited(test, limit_test), spec.classes, spec.shape)


def _augments(name, aug):
    """Whether the training split of ``name`` is augmented (CIFAR-10 with aug01, ImageNet crops)."""
    return name == 'resImgnet112v3' or (name == 'cifar10' and aug == 'aug01')
