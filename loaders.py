"""The loaders of a run: train/test loaders for this rank (torchvision data sets, or any dataset
object: the seam tests use), the device-resident loader for MNIST/CIFAR-10, subsets."""
import torch

import data_load
from ranks import ShardSampler, eval_indices


def build_loaders(args, runtime, train_set=None, test_set=None):
    """Train/test loaders for ``args`` on this rank, plus the dataset indices each rank owns.

    ``train_set``/``test_set`` replace the torchvision data (the seam tests use).
    """
    if train_set is None:
        train_set, test_set = data_load.build_datasets(
            args.data, args.data_dir, augmentation=args.augmentation,
            normalization=args.normalization)
    train_set, test_set = limited(train_set, args.limit_train), limited(test_set, args.limit_test)
    shard = ShardSampler(len(train_set), runtime.rank, runtime.world_size,
                         shuffle=args.shuffle, seed=args.seed)
    train_sampler = shard if runtime.distributed else None
    owned_test = eval_indices(len(test_set), runtime)
    test_sampler = owned_test.tolist() if runtime.distributed else None
    owned_train = shard.indices if runtime.distributed else None
    device_sets = _device_image_sets(args, train_set, test_set)
    if device_sets is not None:
        (train_images, train_labels), (test_images, test_labels) = device_sets
        stats = data_load.normalization_stats(args.data, args.normalization)
        train_loader = data_load.DeviceTensorLoader(
            train_images, train_labels, args.batch_size, device=runtime.device, shuffle=args.shuffle,
            drop_last=args.drop_last,
            augment=args.augmentation and data_load.dataset(args.data).device_augmentation,
            normalization=stats, seed=args.seed + runtime.rank, sampler_indices=owned_train)
        test_loader = data_load.DeviceTensorLoader(
            test_images, test_labels, args.test_batch_size, device=runtime.device, normalization=stats,
            sampler_indices=owned_test if runtime.distributed else None)
        return train_loader, test_loader, owned_train, owned_test if runtime.distributed else None
    train_loader, test_loader = data_load.make_loaders(
        train_set, test_set, args.batch_size, args.test_batch_size, shuffle=args.shuffle,
        drop_last=args.drop_last, num_workers=args.workers,
        pin_memory=runtime.device.type == 'cuda', train_sampler=train_sampler,
        test_sampler=test_sampler)
    return train_loader, test_loader, owned_train, owned_test if runtime.distributed else None


def _image_tensors(dataset):
    """(uint8 images [N,C,H,W], labels) of a torchvision MNIST/CIFAR-10 set or a Subset of one, else None."""
    indices = None
    if isinstance(dataset, torch.utils.data.Subset):
        dataset, indices = dataset.dataset, torch.as_tensor(list(dataset.indices), dtype=torch.long)
    data, targets = getattr(dataset, 'data', None), getattr(dataset, 'targets', None)
    if data is None or targets is None:
        return None
    try:
        images = data_load.images_nchw(data)
    except ValueError:
        return None
    labels = torch.as_tensor(targets, dtype=torch.long)
    if indices is not None:
        images, labels = images[indices], labels[indices]
    return images, labels


def _device_image_sets(args, train_set, test_set):
    """Both sets as image tensors for ``--loader device`` (or auto on MNIST/CIFAR-10), else None."""
    choice = getattr(args, 'loader', 'auto')
    if choice == 'torch' or (choice == 'auto' and not data_load.dataset(args.data).device_loader):
        return None
    sets = _image_tensors(train_set), _image_tensors(test_set)
    if None in sets:
        if choice == 'device':
            raise ValueError('--loader device needs torchvision MNIST/CIFAR-10 data sets (uint8 .data and '
                             '.targets); use --loader torch')
        return None
    return sets


def set_loader_epoch(loader, epoch, seed):
    """Make epoch ``epoch``'s order (and augmentation) a function of (seed, epoch): exact --resume."""
    if isinstance(getattr(loader, 'sampler', None), ShardSampler):
        loader.sampler.set_epoch(epoch)
    elif isinstance(loader, data_load.DeviceTensorLoader):
        loader.generator.manual_seed(seed + 1_000_003 * (epoch + 1))


def limited(dataset, limit):
    """The first ``limit`` examples of ``dataset`` (all of them when limit is None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, range(limit))


def test_loader_for(test_set, args, runtime):
    """An ordered loader over this rank's share of ``test_set`` (all of it in one process)."""
    sampler = eval_indices(len(test_set), runtime).tolist() if runtime.distributed else None
    return torch.utils.data.DataLoader(data_load.IndexedDataset(test_set), batch_size=args.test_batch_size,
                                       sampler=sampler, num_workers=args.workers)
