"""Data sets and loaders: MNIST, CIFAR-10, TinyImageNet (and lolip's SVHN and Restricted ImageNet).

Every data set is declared once, by a ``DatasetSpec`` in ``DATASETS`` (``register_dataset``):
shape, classes, builder, normalisation, whether it can live on the device, the paper's radii and
the empirical-Lipschitzness box. Two paths lead to batches of ``(x, y, index)``:

* ``make_loaders``: torchvision datasets (or any dataset object) behind ``DataLoader``s;
* ``DeviceTensorLoader``: the whole image set as one uint8 tensor on a device, batched and
  augmented there (the data sets whose spec says ``device_loader``).

``index`` is each example's position in its dataset, used to address per-example stores.
"""

import contextlib
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

CROP_PADDING = 4
TINY_FOLDER = 'tiny-imagenet-200'

# What torchvision raises when files are absent, truncated, fail their md5 or cannot be fetched
# (urllib's URLError is an OSError).
_TORCHVISION_LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError)


class IndexedDataset(Dataset):
    """Wraps a dataset so that each item is ``(x, y, index)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        x, y = self.dataset[index]
        return x, y, index


class DataNotFoundError(RuntimeError):
    """A dataset's files are missing or unreadable; the message says where to put them."""


# ----------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class DatasetSpec:
    """Everything the project needs to know about one data set (README, Extending).

    build(data_dir, augmentation, normalization, download) -> (train set, test set), torchvision-style
    datasets of (image tensor in [0, 1], label); ``normalization``: (mean, std) applied with
    ``--normalization`` (None: never normalised); ``device_loader``: the sets expose uint8 ``.data`` and
    ``.targets`` (torchvision MNIST/CIFAR-10) and can be held on the device; ``device_augmentation``:
    random crop + flip there when augmenting; ``paper_radii``: the L2 radii certified accuracy is
    reported at; ``lip_eps``: the L-infinity box of the empirical local Lipschitzness.
    """
    name: str
    shape: tuple
    classes: int
    build: object
    normalization: tuple = None
    device_loader: bool = False
    device_augmentation: bool = False
    paper_radii: tuple = ()
    lip_eps: float = 0.031


DATASETS = {}


def register_dataset(spec):
    """Declare a data set: the one call a new data set needs."""
    DATASETS[spec.name] = spec
    return spec


def dataset(name):
    """The ``DatasetSpec`` of ``name``; ValueError naming the known ones otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


def input_shape(data):
    """(C, H, W) of one input image of ``data``."""
    return dataset(data).shape


def num_classes(data):
    """Number of classes of ``data``."""
    return dataset(data).classes


def normalization_stats(data, normalization):
    """(mean, std) to normalise ``data`` with, or None (off, or a data set never normalised)."""
    return dataset(data).normalization if normalization else None


def _compose(data, augment_steps, normalization):
    """Augmentation steps, then ToTensor, then normalisation if asked for."""
    steps = [*augment_steps, transforms.ToTensor()]
    stats = normalization_stats(data, normalization)
    if stats is not None:
        steps.append(transforms.Normalize(*stats))
    return transforms.Compose(steps)


def _cifar_transforms(augmentation, normalization):
    """(train, test) transforms for CIFAR-10."""
    augment = [transforms.RandomCrop(32, padding=CROP_PADDING),
               transforms.RandomHorizontalFlip()] if augmentation else []
    return (_compose('cifar10', augment, normalization),
            _compose('cifar10', [], normalization))


def _tiny_transforms(augmentation, normalization):
    """(train, test) transforms for TinyImageNet; training images are always flipped."""
    augment = [transforms.RandomCrop(64, padding=CROP_PADDING)] if augmentation else []
    augment.append(transforms.RandomHorizontalFlip())
    return (_compose('tinyimagenet', augment, normalization),
            _compose('tinyimagenet', [], normalization))


def _missing_message(name, data_dir, expected, download):
    """One line saying which dataset is missing, where it was looked for and what to do."""
    if download:
        return (f'{name} not found (or corrupt) under {data_dir} and it could not be downloaded; '
                f'put {expected} there or run on a machine with network')
    return (f'{name} not found (or corrupt) under {data_dir} and download is off; '
            f'put {expected} there or allow the download on a machine with network')


def _torchvision_pair(dataset_class, name, expected, data_dir, download, transform_pair):
    """(train, test) torchvision datasets; any loading failure becomes a DataNotFoundError and
    leaves no folder the attempt created behind."""
    train_transform, test_transform = transform_pair
    try:
        with no_new_empty_folders(data_dir):
            train_set = dataset_class(data_dir, train=True, transform=train_transform,
                                      download=download)
            test_set = dataset_class(data_dir, train=False, transform=test_transform,
                                     download=download)
    except _TORCHVISION_LOAD_ERRORS as error:
        raise DataNotFoundError(_missing_message(name, data_dir, expected, download)) from error
    return train_set, test_set


def _folders(root, depth=2):
    """The folders that exist among ``root``, its parents and the ``depth`` levels below it."""
    root = Path(root).absolute()
    found = {p for p in (root, *root.parents) if p.is_dir()}
    level = [root] if root.is_dir() else []
    for _ in range(depth):
        level = [child for folder in level for child in folder.iterdir() if child.is_dir()]
        found.update(level)
    return found


@contextlib.contextmanager
def no_new_empty_folders(root):
    """When the block fails, remove the folders it created at or near ``root`` (see ``_folders``)
    that are still empty: a failed download (e.g. torchvision's ``MNIST/raw``) leaves nothing behind."""
    before = _folders(root)
    try:
        yield
    except BaseException:
        for folder in sorted(_folders(root) - before, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):      # not empty: the attempt kept a file there
                folder.rmdir()
        raise


def _check_tiny_layout(root):
    """Raises DataNotFoundError unless ``root`` holds train/ and a regrouped val/."""
    if not (root / 'train').is_dir() or not (root / 'val').is_dir():
        raise DataNotFoundError(
            f'TinyImageNet not found under {root} (needs train/ and val/); '
            f'run TinyImagenet/data/tinyimagenet.sh {root.parent} to download and prepare it')
    if (root / 'val' / 'images').is_dir():
        raise DataNotFoundError(
            f'TinyImageNet val/ under {root} is not regrouped into class folders; '
            f'run python TinyImagenet/data/val_format.py --root {root}')


def _tinyimagenet_pair(data_dir, transform_pair):
    """(train, val) ImageFolders of TinyImageNet with matching class indices."""
    root = Path(data_dir) / TINY_FOLDER
    _check_tiny_layout(root)
    train_transform, test_transform = transform_pair
    try:
        train_set = datasets.ImageFolder(root / 'train', transform=train_transform)
        test_set = datasets.ImageFolder(root / 'val', transform=test_transform)
    except OSError as error:
        raise DataNotFoundError(
            f'TinyImageNet images not found under {root} ({error}); '
            f'run TinyImagenet/data/tinyimagenet.sh {root.parent}') from error
    if train_set.classes != test_set.classes:
        raise DataNotFoundError(
            f'TinyImageNet under {root}: val/ class folders differ from train/ ones; unpack '
            f'the archive again and run python TinyImagenet/data/val_format.py --root {root}')
    return train_set, test_set


def build_datasets(data, data_dir='data/', *, augmentation=True, normalization=False,
                   download=True):
    """(train_set, test_set) of ``data`` with their transforms, not yet indexed."""
    return dataset(data).build(data_dir, augmentation, normalization, download)


def _mnist(data_dir, augmentation, normalization, download):
    plain = transforms.ToTensor()
    return _torchvision_pair(datasets.MNIST, 'MNIST', 'MNIST/raw/ (the four IDX files)', data_dir, download,
                             (plain, plain))


def _cifar10(data_dir, augmentation, normalization, download):
    return _torchvision_pair(datasets.CIFAR10, 'CIFAR-10', 'cifar-10-batches-py/', data_dir, download,
                             _cifar_transforms(augmentation, normalization))


def _tinyimagenet(data_dir, augmentation, normalization, download):
    return _tinyimagenet_pair(data_dir, _tiny_transforms(augmentation, normalization))


def make_loaders(train_set, test_set, batch_size, test_batch_size, *, shuffle=True,
                 drop_last=False, num_workers=0, pin_memory=False, train_sampler=None,
                 test_sampler=None):
    """(train_loader, test_loader) over indexed copies of the sets; the test one keeps order."""
    common = dict(num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=num_workers > 0)
    train_loader = DataLoader(IndexedDataset(train_set), batch_size=batch_size,
                              shuffle=None if train_sampler is not None else shuffle,
                              sampler=train_sampler, drop_last=drop_last, **common)
    test_loader = DataLoader(IndexedDataset(test_set), batch_size=test_batch_size,
                             sampler=test_sampler, **common)
    return train_loader, test_loader


def random_crop_flip(images, padding, generator):
    """Per-sample random crop of a zero-padded batch plus a random horizontal flip.

    Same distribution as torchvision RandomCrop(size, padding) + RandomHorizontalFlip():
    each sample gets its own offsets in [0, 2*padding] and flips with probability 1/2.
    """
    count, _, height, width = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (count, 1), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (count, 1), generator=generator, device=device)
    flip = torch.rand((count, 1), generator=generator, device=device) < 0.5
    columns = torch.arange(width, device=device)
    columns = torch.where(flip, width - 1 - columns, columns) + left
    rows = torch.arange(height, device=device) + top
    samples = torch.arange(count, device=device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[samples, rows[:, :, None], columns[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()


def images_nchw(data):
    """uint8 images [N, C, H, W] from torchvision's [N, H, W] or channels-last [N, H, W, C]."""
    images = torch.as_tensor(data)
    if images.dtype != torch.uint8 or images.dim() not in (3, 4):
        raise ValueError(f'expected uint8 images [N,H,W] or [N,H,W,C], got {images.dtype} '
                         f'{list(images.shape)}')
    if images.dim() == 3:
        return images.unsqueeze(1).contiguous()
    return images.permute(0, 3, 1, 2).contiguous()


class DeviceImageSet:
    """A whole image set on one device: uint8 ``images`` [N,C,H,W] and int64 ``labels``."""

    def __init__(self, images, labels):
        self.images = images
        self.labels = labels

    def __len__(self):
        return self.images.shape[0]


class DeviceTensorLoader:
    """Batches ``(x, y, index)`` of an image set held on one device, augmented there.

    ``x`` is float in [0, 1] (normalised when ``normalization=(mean, std)``), ``index`` the global
    position of each example. ``sampler_indices`` restricts iteration to the examples this
    process owns. Shuffling draws a new order each epoch from a generator seeded with ``seed``.
    """

    def __init__(self, images, labels, batch_size, *, device=None, shuffle=False,
                 drop_last=False, augment=False, normalization=None, seed=0,
                 sampler_indices=None):
        device = torch.device(device) if device is not None else images.device
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f'expected uint8 images [N,C,H,W], got {images.dtype} '
                             f'{list(images.shape)}')
        if len(labels) != len(images):
            raise ValueError(f'{len(images)} images but {len(labels)} labels')
        self.dataset = DeviceImageSet(images.to(device), torch.as_tensor(labels).to(device).long())
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.owned = (torch.arange(len(images), device=device) if sampler_indices is None
                      else torch.as_tensor(sampler_indices).to(device).long())
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.mean, self.std = self._stats_tensors(normalization, device)

    @classmethod
    def from_dataset(cls, dataset, batch_size, **options):
        """Loader over a torchvision MNIST/CIFAR10 set, read from its ``.data``/``.targets``."""
        return cls(images_nchw(dataset.data), torch.as_tensor(dataset.targets), batch_size,
                   **options)

    @staticmethod
    def _stats_tensors(normalization, device):
        """(mean, std) as [1, C, 1, 1] tensors (C may be 1), or (None, None)."""
        if normalization is None:
            return None, None
        mean, std = (torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)
                     for values in normalization)
        return mean, std

    def __len__(self):
        rounding = math.floor if self.drop_last else math.ceil
        return rounding(len(self.owned) / self.batch_size)

    def __iter__(self):
        order = self._epoch_order()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield self._batch(order[start:start + self.batch_size])

    def _epoch_order(self):
        """Owned global indices, in a fresh random order when shuffling."""
        if not self.shuffle:
            return self.owned
        permutation = torch.randperm(len(self.owned), generator=self.generator,
                                     device=self.owned.device)
        return self.owned[permutation]

    def _batch(self, index):
        """(x, y, index) for the given global indices."""
        images = self.dataset.images[index]
        if self.augment:
            images = random_crop_flip(images, CROP_PADDING, self.generator)
        x = images.float().div_(255)
        if self.mean is not None:
            x = x.sub_(self.mean).div_(self.std)
        return x, self.dataset.labels[index], index


# ----------------------------------------------------------------------------- lolip's data sets
# SVHN and Restricted ImageNet (used by lolip/, docs/method_lolip.md §5); images in [0, 1], no
# normalisation, batches through make_loaders.

RESTRICTED_IMAGENET_FOLDER = 'restricted_imagenet'


def svhn_datasets(data_dir, download=False):
    """(train, test) SVHN splits (no "extra"), as tensors in [0, 1]."""
    pair = []
    try:
        for split in ('train', 'test'):
            pair.append(datasets.SVHN(data_dir, split=split, transform=transforms.ToTensor(),
                                      download=download))
    except _TORCHVISION_LOAD_ERRORS as error:
        raise DataNotFoundError(_missing_message(
            'SVHN', data_dir, 'train_32x32.mat and test_32x32.mat', download)) from error
    return tuple(pair)


def restricted_imagenet_datasets(data_dir, augmentation=True):
    """(train, val) ImageFolders of Restricted ImageNet, 9 super-classes in alphabetical order.

    Reads ``<data_dir>/restricted_imagenet/{train,val}/<super-class>/`` as written by
    ``python -m lolip.prepare_restricted_imagenet``. Train: resize 72, random crop 64 with padding
    8 (no flip); val: resize 72, centre crop 64.
    """
    root = Path(data_dir) / RESTRICTED_IMAGENET_FOLDER
    if not (root / 'train').is_dir() or not (root / 'val').is_dir():
        raise DataNotFoundError(
            f'Restricted ImageNet not found under {root} (needs train/ and val/); build it from '
            f'an ImageNet folder: python -m lolip.prepare_restricted_imagenet '
            f'--imagenet IMAGENET_DIR --data_dir {data_dir}')
    crop = (transforms.RandomCrop(64, padding=8) if augmentation else transforms.CenterCrop(64))
    train_transform = transforms.Compose([transforms.Resize(72), crop, transforms.ToTensor()])
    val_transform = transforms.Compose([transforms.Resize(72), transforms.CenterCrop(64),
                                        transforms.ToTensor()])
    try:
        return (datasets.ImageFolder(root / 'train', transform=train_transform),
                datasets.ImageFolder(root / 'val', transform=val_transform))
    except OSError as error:
        raise DataNotFoundError(f'Restricted ImageNet under {root} is unreadable ({error}); '
                                f'run python -m lolip.prepare_restricted_imagenet again') from error


# ----------------------------------------------------------------------------- the data sets

PAPER_RADII_CIFAR = (36 / 255, 72 / 255, 108 / 255)
register_dataset(DatasetSpec('mnist', (1, 28, 28), 10, _mnist, device_loader=True, paper_radii=(1.58,),
                             lip_eps=0.1))
register_dataset(DatasetSpec('cifar10', (3, 32, 32), 10, _cifar10,
                             normalization=((0.485, 0.456, 0.406), (0.225, 0.225, 0.225)),
                             device_loader=True, device_augmentation=True, paper_radii=PAPER_RADII_CIFAR))
register_dataset(DatasetSpec('tinyimagenet', (3, 64, 64), 200, _tinyimagenet,
                             normalization=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), paper_radii=PAPER_RADII_CIFAR))
register_dataset(DatasetSpec('svhn', (3, 32, 32), 10, lambda data_dir, augmentation, normalization, download:
                             svhn_datasets(data_dir, download=download)))
register_dataset(DatasetSpec('resImgnet112v3', (3, 64, 64), 9, lambda data_dir, augmentation, normalization, download:
                             restricted_imagenet_datasets(data_dir, augmentation=augmentation)))
