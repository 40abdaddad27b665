"""Tests of data_load.py and TinyImagenet/data/val_format.py (CPU, a few seconds)."""

import importlib.util
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

import data_load
from data_load import DataNotFoundError, DeviceTensorLoader, IndexedDataset, build_datasets, make_loaders
from helpers import MNIST_MINI, needs_mnist

REPO = Path(__file__).resolve().parents[1]
VAL_FORMAT = REPO / 'TinyImagenet' / 'data' / 'val_format.py'


def load_val_format():
    """The val_format.py script as a module."""
    spec = importlib.util.spec_from_file_location('val_format', VAL_FORMAT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_set(count=23):
    """A TensorDataset whose inputs equal their position."""
    return TensorDataset(torch.arange(count).float().unsqueeze(1), torch.arange(count) % 3)


def all_indices(loader):
    """Concatenated yielded indices of one epoch."""
    return torch.cat([torch.as_tensor(index) for _, _, index in loader])


# ----- IndexedDataset and make_loaders -----

def test_indexed_dataset_returns_position():
    dataset = IndexedDataset(small_set())
    assert len(dataset) == 23
    x, y, index = dataset[7]
    assert index == 7 and x.item() == 7.0 and y.item() == 7 % 3


def test_make_loaders_test_order_kept_and_train_shuffled():
    torch.manual_seed(0)
    train_loader, test_loader = make_loaders(small_set(), small_set(), 5, 4)
    assert torch.equal(all_indices(test_loader), torch.arange(23))
    first, second = all_indices(train_loader), all_indices(train_loader)
    assert torch.equal(first.sort().values, torch.arange(23))
    assert not torch.equal(first, torch.arange(23)) or not torch.equal(second, torch.arange(23))
    for x, _, index in train_loader:
        assert torch.equal(x.squeeze(1), index.float())


def test_make_loaders_drop_last_and_sampler():
    train_loader, test_loader = make_loaders(small_set(), small_set(), 5, 5, drop_last=True)
    assert len(train_loader) == 4 and len(all_indices(train_loader)) == 20
    assert len(test_loader) == 5
    sampler = [3, 1, 2]
    train_loader, _ = make_loaders(small_set(), small_set(), 2, 2, train_sampler=sampler)
    assert all_indices(train_loader).tolist() == sampler


# ----- torchvision datasets -----

@needs_mnist
def test_mnist_mini_loader():
    train_set, test_set = build_datasets('mnist', MNIST_MINI, augmentation=True, normalization=True,
                                         download=False)
    train_loader, test_loader = make_loaders(train_set, test_set, 500, 500)
    assert len(train_loader.dataset) == 8000 and len(test_loader.dataset) == 2000
    x, y, index = next(iter(test_loader))
    assert x.shape == (500, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert torch.equal(index, torch.arange(500)) and y.dtype == torch.int64


def test_missing_cifar_names_folder(tmp_path):
    with pytest.raises(DataNotFoundError) as caught:
        build_datasets('cifar10', tmp_path, download=False)
    message = str(caught.value)
    assert str(tmp_path) in message and 'CIFAR-10' in message and '\n' not in message
    assert 'cifar-10-batches-py' in message


def test_failed_download_becomes_data_not_found(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError('no network')
    monkeypatch.setattr(data_load.datasets, 'CIFAR10', offline)
    with pytest.raises(DataNotFoundError, match='could not be downloaded'):
        build_datasets('cifar10', tmp_path, download=True)


def test_shapes_and_classes():
    assert data_load.input_shape('cifar10') == (3, 32, 32)
    assert data_load.num_classes('tinyimagenet') == 200
    assert data_load.input_shape('svhn') == (3, 32, 32)           # lolip's, declared in the same registry
    with pytest.raises(ValueError, match='unknown dataset'):
        data_load.input_shape('imagenet')
    assert not data_load.dataset('tinyimagenet').device_loader    # image folders: the DataLoader path


def test_cifar_transforms_follow_spec():
    train_transform, test_transform = data_load._cifar_transforms(True, True)
    names = [type(step).__name__ for step in train_transform.transforms]
    assert names == ['RandomCrop', 'RandomHorizontalFlip', 'ToTensor', 'Normalize']
    assert [type(step).__name__ for step in test_transform.transforms] == ['ToTensor', 'Normalize']
    assert test_transform.transforms[-1].std == (0.225, 0.225, 0.225)


# ----- DeviceTensorLoader -----

def random_images(count, channels=3, size=8, seed=0):
    """uint8 images and int64 labels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8,
                           generator=generator)
    return images, torch.arange(count) % 10


def test_device_loader_every_index_once_per_epoch():
    images, labels = random_images(103)
    loader = DeviceTensorLoader(images, labels, 10, shuffle=True, seed=1)
    assert len(loader) == 11 and len(loader.dataset) == 103
    first, second = all_indices(loader), all_indices(loader)
    assert torch.equal(first.sort().values, torch.arange(103))
    assert torch.equal(second.sort().values, torch.arange(103))
    assert not torch.equal(first, second)
    same_seed = DeviceTensorLoader(images, labels, 10, shuffle=True, seed=1)
    assert torch.equal(all_indices(same_seed), first)
    dropping = DeviceTensorLoader(images, labels, 10, shuffle=True, drop_last=True)
    assert len(dropping) == 10 and all_indices(dropping).unique().numel() == 100


def test_device_loader_without_augmentation_is_exact():
    images, labels = random_images(20)
    loader = DeviceTensorLoader(images, labels, 6, shuffle=True)
    for x, y, index in loader:
        assert torch.equal(x, images[index].float() / 255)
        assert torch.equal(y, labels[index])


def test_device_loader_normalization():
    images, labels = random_images(4)
    stats = ((0.485, 0.456, 0.406), (0.225, 0.225, 0.225))
    x, _, _ = next(iter(DeviceTensorLoader(images, labels, 4, normalization=stats)))
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in stats)
    torch.testing.assert_close(x, (images.float() / 255 - mean) / std)


def test_device_loader_sampler_indices_are_global():
    images, labels = random_images(50)
    owned = torch.tensor([5, 17, 2, 40, 33])
    loader = DeviceTensorLoader(images, labels, 2, shuffle=True, sampler_indices=owned)
    assert len(loader) == 3
    for x, y, index in loader:
        assert torch.equal(x, images[index].float() / 255) and torch.equal(y, labels[index])
    assert sorted(all_indices(loader).tolist()) == sorted(owned.tolist())


def all_crops_and_flips(image):
    """Every 4-pixel-padded crop of ``image``, flipped or not: [162, C, H, W]."""
    _, height, width = image.shape
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    crops = [padded[:, top:top + height, left:left + width]
             for top in range(9) for left in range(9)]
    return torch.stack(crops + [crop.flip(-1) for crop in crops])


def test_augmentation_yields_a_crop_and_flip_of_each_image():
    images, labels = random_images(16, size=8)
    x, _, index = next(iter(DeviceTensorLoader(images, labels, 16, shuffle=True, augment=True)))
    assert x.shape == (16, 3, 8, 8)
    augmented = (x * 255).round().byte()
    for sample, position in zip(augmented, index):
        candidates = all_crops_and_flips(images[position])
        assert (candidates == sample).flatten(1).all(1).any()


def test_crop_offsets_are_uniform():
    count, size = 4000, 32
    images = torch.full((count, 1, size, size), 255, dtype=torch.uint8)
    loader = DeviceTensorLoader(images, torch.zeros(count), count, augment=True, seed=3)
    x, _, _ = next(iter(loader))
    # Offset d in {-4..4} per axis leaves |d| zero rows/columns; E|d| = 20/9.
    expected_zero = 1 - (1 - 20 / (9 * size)) ** 2
    assert abs((x == 0).float().mean().item() - expected_zero) < 0.01
    rows = x[:, 0, :, size // 2] == 0
    top, bottom = rows[:, :4].sum(1), rows[:, -4:].sum(1)
    offsets = bottom - top
    frequencies = torch.bincount(offsets + 4, minlength=9).float() / count
    assert frequencies.numel() == 9 and torch.all((frequencies - 1 / 9).abs() < 0.03)


def test_flips_half_the_time():
    count, size = 4000, 32
    image = torch.full((1, size, size), 255, dtype=torch.uint8)
    image[:, :, size // 2:] = 100
    loader = DeviceTensorLoader(image.expand(count, -1, -1, -1).contiguous(),
                                torch.zeros(count), count, augment=True, seed=4)
    x, _, _ = next(iter(loader))
    # Columns 4..7 always come from the left half unless flipped (then from the right half).
    strip = (x[:, 0, 4:28, 4:8] * 255).round()
    flipped = (strip == 100).all(-1).all(-1)
    assert torch.all(flipped | (strip == 255).all(-1).all(-1))
    assert abs(flipped.float().mean().item() - 0.5) < 0.04


class ChannelsLastSet:
    """Stand-in for torchvision CIFAR10: numpy [N,H,W,3] uint8 data and list targets."""

    def __init__(self, count):
        rng = np.random.default_rng(0)
        self.data = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        self.targets = list(range(count))


def test_from_dataset_channels_last():
    dataset = ChannelsLastSet(6)
    x, y, _ = next(iter(DeviceTensorLoader.from_dataset(dataset, 6)))
    expected = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(x, expected) and y.tolist() == dataset.targets


@needs_mnist
def test_device_loader_matches_torchvision_mnist():
    spec = data_load.dataset('mnist')
    assert spec.device_loader and not spec.device_augmentation
    assert data_load.normalization_stats('mnist', True) is None    # MNIST is never normalised
    _, test_set = build_datasets('mnist', MNIST_MINI, download=False)
    test_loader = DeviceTensorLoader.from_dataset(test_set, 64, device='cpu')
    assert len(test_loader.dataset) == 2000
    x, y, index = next(iter(test_loader))
    assert torch.equal(index, torch.arange(64))
    assert torch.equal(x, torch.stack([test_set[i][0] for i in range(64)]))
    assert y.tolist() == [test_set[i][1] for i in range(64)]


# ----- TinyImageNet -----

WNIDS = ['n001', 'n002', 'n003']


def save_image(path, shade):
    """A flat 64x64 RGB image whose red channel is ``shade``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (64, 64), (shade, 10, 200)).save(path, format='JPEG')


def fake_tiny(root):
    """A tiny-imagenet-200 tree as unpacked from the archive, 3 classes; returns val wnids."""
    for label, wnid in enumerate(WNIDS):
        for k in range(2):
            save_image(root / 'train' / wnid / 'images' / f'{wnid}_{k}.JPEG', 40 * label)
    annotations = {f'val_{k}.JPEG': WNIDS[(k * 2) % 3] for k in range(6)}
    for name, wnid in annotations.items():
        save_image(root / 'val' / 'images' / name, 40 * WNIDS.index(wnid))
    (root / 'val' / 'val_annotations.txt').write_text(
        ''.join(f'{name}\t{wnid}\t0\t0\t63\t63\n' for name, wnid in annotations.items()))
    return annotations


def test_tinyimagenet_regroup_and_loaders(tmp_path):
    root = tmp_path / 'tiny-imagenet-200'
    annotations = fake_tiny(root)
    with pytest.raises(DataNotFoundError, match='val_format.py'):
        build_datasets('tinyimagenet', tmp_path)
    assert load_val_format().regroup_val(root) == 6
    train_set, test_set = build_datasets('tinyimagenet', tmp_path, augmentation=True,
                                         normalization=True)
    assert train_set.classes == WNIDS and len(train_set) == 6 and len(test_set) == 6
    for path, label in test_set.samples:
        assert WNIDS[label] == annotations[Path(path).name]
    train_loader, test_loader = make_loaders(train_set, test_set, 4, 4)
    x, y, _ = next(iter(test_loader))
    assert x.shape == (4, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    # Red channel encodes the class: 40*label/255 before normalisation to (v - 0.5) / 0.5.
    red = x[:, 0].mean((1, 2)) * 0.5 + 0.5
    torch.testing.assert_close(red, 40 * y.float() / 255, atol=0.02, rtol=0)
    x, _, _ = next(iter(train_loader))
    assert x.shape == (4, 3, 64, 64)


def test_tinyimagenet_missing_points_to_download_script(tmp_path):
    with pytest.raises(DataNotFoundError, match='tinyimagenet.sh') as caught:
        build_datasets('tinyimagenet', tmp_path)
    assert str(tmp_path) in str(caught.value)


def run_val_format(*args):
    """Runs the val_format.py CLI; returns the completed process."""
    return subprocess.run([sys.executable, str(VAL_FORMAT), *args], capture_output=True,
                          text=True, timeout=60)


def test_val_format_cli_is_idempotent(tmp_path):
    root = tmp_path / 'tiny-imagenet-200'
    fake_tiny(root)
    first = run_val_format('--root', str(root))
    assert first.returncode == 0 and 'regrouped 6' in first.stdout
    again = run_val_format('--root', str(root))
    assert again.returncode == 0 and 'already' in again.stdout
    assert sorted(path.name for path in (root / 'val').iterdir() if path.is_dir()) == WNIDS


def test_val_format_cli_wrong_root(tmp_path):
    result = run_val_format('--root', str(tmp_path / 'nowhere'))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and 'Traceback' not in result.stderr
    assert 'nowhere' in result.stderr


def test_val_format_missing_annotations(tmp_path):
    root = tmp_path / 'tiny-imagenet-200'
    save_image(root / 'val' / 'images' / 'val_0.JPEG', 0)
    result = run_val_format('--root', str(root))
    assert result.returncode == 2 and 'val_annotations.txt' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
