"""The data sets of the original (SPEC_lolip section 5), all in [0, 1] without normalisation.

``mnist``, ``cifar10`` (``aug01``: random crop 32 with padding 4 + flip), ``svhn`` (train + test,
no extra) and ``resImgnet112v3`` (Restricted ImageNet, 64x64, built by
``lolip.prepare_restricted_imagenet``), all through ``data_load``.
"""
from dataclasses import dataclass

import data_load
import trainer

DATASETS = ('mnist', 'cifar10', 'svhn', 'resImgnet112v3')
SHAPES = {'mnist': (1, 28, 28), 'cifar10': (3, 32, 32), 'svhn': (3, 32, 32),
          'resImgnet112v3': (3, 64, 64)}
CLASSES = {'mnist': 10, 'cifar10': 10, 'svhn': 10, 'resImgnet112v3': 9}


@dataclass
class Data:
    train: object
    train_eval: object  # the training images without augmentation, for the report
    test: object
    num_classes: int
    shape: tuple


def load(name, data_dir, *, aug=None, limit_train=None, limit_test=None, download=False):
    """Data of ``name`` (first ``limit_*`` examples of each split); DataNotFoundError if absent."""
    train, test = _splits(name, data_dir, True, aug, download)
    train_eval = _splits(name, data_dir, False, aug, download)[0] if _augments(name, aug) else train
    return Data(trainer.limited(train, limit_train), trainer.limited(train_eval, limit_train),
                trainer.limited(test, limit_test), CLASSES[name], SHAPES[name])


def _augments(name, aug):
    """Whether the training split of ``name`` is augmented (CIFAR-10 with aug01, ImageNet crops)."""
    return name == 'resImgnet112v3' or (name == 'cifar10' and aug == 'aug01')


def _splits(name, data_dir, augmentation, aug, download):
    """(train, test) of ``name``, the training split augmented when asked and the run says so."""
    if name == 'mnist':
        return data_load.build_datasets('mnist', data_dir, download=download)
    if name == 'cifar10':
        return data_load.build_datasets('cifar10', data_dir, download=download,
                                        augmentation=augmentation and aug == 'aug01')
    if name == 'svhn':
        return data_load.svhn_datasets(data_dir, download=download)
    if name == 'resImgnet112v3':
        return data_load.restricted_imagenet_datasets(data_dir, augmentation=augmentation)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
