"""Where a process runs and which share of the work it has: one process or many (``torchrun``).

Rank 0 alone writes logs and checkpoints; numbers are summed or gathered over ranks; every rank
gets a fixed share of the training data (``ShardSampler``) and of the test set (``eval_indices``).
"""
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm


@dataclass
class Runtime:
    """Where this process runs and which share of the work it has."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def gather(self, tensor):
        """Concatenate a 1-D CPU tensor over all ranks (identity in one process)."""
        if not self.distributed:
            return tensor
        parts = [None] * self.world_size
        dist.all_gather_object(parts, tensor)
        return torch.cat(parts)

    def shared(self, value):
        """The main process's ``value`` (a picklable object) on every rank (itself in one process)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values):
        """Sum a list of numbers over all ranks (identity in one process)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()


def init_runtime(device):
    """Runtime for ``--device``; joins the process group when launched by torchrun."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size == 1:
        return Runtime(torch.device(device))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device.startswith('cuda'):
        torch.cuda.set_device(local_rank)
        device = f'cuda:{local_rank}'
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    return Runtime(torch.device(device), dist.get_rank(), dist.get_world_size(), local_rank)


def close_runtime(runtime):
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


class ShardSampler(torch.utils.data.Sampler):
    """Every epoch gives this rank the same fixed share of the data set, in a new order.

    The examples are dealt round-robin: rank r owns r, r + N, r + 2N, ... among the first
    ``N * (len // N)`` (at most N - 1 examples are left out of training), so every rank runs the
    same number of steps and a rank's per-example store only holds its own share. Without
    shuffling, step k of N ranks sees exactly batch k of one process with an N times larger batch.
    """

    def __init__(self, size, rank, world_size, *, shuffle=True, seed=0):
        self.indices = torch.arange(world_size * (size // world_size))[rank::world_size]
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(self.indices.tolist())
        generator = torch.Generator().manual_seed(self.seed + 1 + self.epoch)
        return iter(self.indices[torch.randperm(len(self.indices), generator=generator)].tolist())

    def __len__(self):
        return len(self.indices)


def eval_indices(size, runtime):
    """Test examples of this rank: every example once over all ranks, none padded."""
    return torch.arange(size)[runtime.rank::runtime.world_size]


def progress(loader, runtime, desc):
    return tqdm(loader, desc=desc, leave=False, disable=not runtime.is_main or not sys.stderr.isatty(),
                dynamic_ncols=True)
