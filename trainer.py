"""The training procedure of SPEC section 4, shared by every training script.

One process or many (``torchrun``): rank 0 alone writes logs and checkpoints, metrics are summed
over ranks, every rank keeps the per-example singular vectors of its own share of the data.
"""
import argparse
import csv
import functools
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import attacks
import data_load
import local_bound
import spectral
import utils
from settings import CERTIFIED, BoundSettings


# ----------------------------------------------------------------------------- processes

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


# ----------------------------------------------------------------------------- data

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
            drop_last=args.drop_last, augment=args.augmentation and args.data == 'cifar10',
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
    if choice == 'torch' or (choice == 'auto' and args.data not in ('mnist', 'cifar10')):
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


# ----------------------------------------------------------------------------- checkpoints

class UsageError(RuntimeError):
    """A combination of flags this run cannot honour (one-line message)."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or does not fit the requested model (one-line message)."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN or inf (one-line message naming where)."""


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a torn checkpoint.

    Refuses (NonFiniteError, nothing written) an object holding a NaN or inf tensor.
    """
    bad = first_non_finite(obj)
    if bad is not None:
        raise NonFiniteError(f'not writing {path}: {bad} holds NaN or inf values')
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_state(path, map_location='cpu'):
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f'cannot read checkpoint {path}: {error}') from error


def load_weights(model, state_dict, path, model_name):
    """Load ``state_dict`` into ``model``; a mismatch is a CheckpointError naming the problem."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}'
              for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        detail = '; '.join(filter(None, [
            f'missing {missing[:4]}' if missing else '',
            f'unexpected {unexpected[:4]}' if unexpected else '',
            f'shape mismatch {shapes[:3]}' if shapes else '']))
        raise CheckpointError(f'{path} does not fit --model {model_name}: {detail}')
    bad = first_non_finite(state_dict)
    if bad is not None:
        raise CheckpointError(f'{path}: tensor {bad} holds NaN or inf values; refusing to load it')
    model.load_state_dict(state_dict)


def first_non_finite(tensors):
    """Name of the first floating tensor of a (nested) dict/list holding NaN or inf, else None."""
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    for name, value in items:
        if torch.is_tensor(value):
            if value.is_floating_point() and not torch.isfinite(value).all():
                return str(name)
        elif isinstance(value, (dict, list, tuple)):
            inner = first_non_finite(value)
            if inner is not None:
                return f'{name}.{inner}'
    return None


def load_model(path, data, model_name, init=1.0, device='cpu'):
    """A model of SPEC section 1 with the weights of checkpoint ``path`` (ours or the authors')."""
    state = load_state(path)
    weights = state.get('state_dict', state) if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise CheckpointError(f'{path} holds no state_dict')
    weights = {k.removeprefix('module.'): v for k, v in weights.items()}
    model = utils.select_model(data, model_name, init, device)
    load_weights(model, weights, path, model_name)
    return model, state


# ----------------------------------------------------------------------------- epochs

@dataclass
class EpochStats:
    loss: float = 0.0
    robust_loss: float = 0.0
    sparse_loss: float = 0.0
    error: float = 0.0
    robust_error: float = 0.0
    count: int = 0


def _summed(runtime, sums, count):
    """EpochStats from per-rank sums: (loss, robust loss, sparse, errors, robust errors)."""
    *totals, n = runtime.sum(list(sums) + [count])
    n = max(n, 1)
    return EpochStats(totals[0] / n, totals[1] / n, totals[2] / n, totals[3] / n, totals[4] / n, int(n))


def _progress(loader, runtime, desc):
    return tqdm(loader, desc=desc, leave=False, disable=not runtime.is_main or not sys.stderr.isatty(),
                dynamic_ncols=True)


def bound_settings(args, training):
    """The ``BoundSettings`` of the flags for training (the authors' warm power iteration and
    clip-and-rescale, with the sparsity term when ``--sparse``) or test time (``--spectral``,
    ``--translation``, ``--test_sniter``, ``--test_opt_iter``, ``--failure_prob``, seeded by ``--seed``)."""
    method = 'power' if training else getattr(args, 'spectral', 'power')
    return BoundSettings(
        method=method, sniter=args.sniter if training else args.test_sniter,
        opt_iter=args.opt_iter if training else args.test_opt_iter, gloro=args.gloro, bound=args.bound,
        translation='iterative' if training else getattr(args, 'translation', 'iterative'),
        sp_thres=getattr(args, 'sp_thres', None) if training and getattr(args, 'sparse', 0) else None,
        power_grad=getattr(args, 'power_grad', 'unrolled') if method == 'power' else 'unrolled',
        failure_prob=getattr(args, 'failure_prob', 1e-9), seed=args.seed)


def train_clean_epoch(net, loader, optimizer, args, runtime, epoch, logger):
    """Warm-up epoch: plain cross-entropy (autocast, with loss scaling for fp16, when ``--amp``)."""
    net.train()
    sums, count = [0.0] * 5, 0
    amp = getattr(args, 'amp', False)
    autocast = torch.autocast(runtime.device.type, dtype=_amp_dtype(runtime), enabled=amp)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=amp and _amp_dtype(runtime) == torch.float16)
    for i, (x, y, _) in enumerate(_progress(loader, runtime, f'epoch {epoch} (clean)')):
        x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
        with autocast:
            logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        # fp16 loss scaling skips steps with inf gradients by design: check parameters only then
        check_step(_plain(net), epoch, i, loss.item(), grads=not scaler.is_enabled())
        wrong = (~local_bound.correct_predictions(logits.float(), y)).sum().item()
        sums[0] += loss.item() * len(y)
        sums[3] += wrong
        count += len(y)
        _log_batch(logger, args, epoch, i, len(loader), loss.item(), wrong / len(y))
    return _summed(runtime, sums, count)


def check_step(model, epoch, batch, loss, *, grads=True):
    """Stop (NonFiniteError) on a non-finite loss, gradient (``grads``) or, after the step, parameter.

    Call after ``optimizer.step()``: one device sync for the whole model when all is well.
    """
    where = f'epoch {epoch}, batch {batch}'
    if not math.isfinite(loss):
        raise NonFiniteError(f'{where}: the training loss is {loss}')
    named = list(model.named_parameters())
    checks = [torch.isfinite(p).all() for _, p in named]
    if grads:
        checks += [torch.isfinite(p.grad).all() for _, p in named if p.grad is not None]
    if bool(torch.stack(checks).all()):
        return
    if grads:
        for name, p in named:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise NonFiniteError(f'{where}: the gradient of {name} holds NaN or inf values')
    for name, p in named:
        if not torch.isfinite(p).all():
            raise NonFiniteError(f'{where}: parameter {name} became NaN or inf after the optimiser step')


def _amp_dtype(runtime):
    return torch.float16 if runtime.device.type == 'cuda' else torch.bfloat16


def train_robust_epoch(net, loader, optimizer, args, runtime, epoch, eps, kappa, store, logger):
    """Robust epoch: kappa CE(z) + (1-kappa) CE(worst-case z) with per-batch eps/kappa increments."""
    net.train()
    settings = bound_settings(args, training=True)
    sums, count = [0.0] * 5, 0
    for i, (x, y, index) in enumerate(_progress(loader, runtime, f'epoch {epoch}')):
        eps_i, kappa_i = utils.batch_schedule(args, eps, kappa, i, len(loader))
        x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
        logits, worst, _, sparsity = net(x, y, eps_i, settings, store=store, index=index)
        ce = F.cross_entropy(logits, y)
        robust = F.cross_entropy(worst, y)
        loss = robust_objective(ce, robust, sparsity, kappa_i, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        utils.clamp_thresholds(_plain(net))
        check_step(_plain(net), epoch, i, loss.item())
        n = len(y)
        wrong = (~local_bound.correct_predictions(logits, y)).sum().item()
        robust_wrong = (~local_bound.strictly_first(worst, y)).sum().item()
        for k, value in enumerate((ce.item() * n, robust.item() * n, sparsity.item() * n, wrong, robust_wrong)):
            sums[k] += value
        count += n
        _log_batch(logger, args, epoch, i, len(loader), ce.item(), wrong / n, robust.item(), robust_wrong / n, eps_i)
    return _summed(runtime, sums, count)


def robust_objective(ce, robust, sparsity, kappa, args):
    """kappa CE(z) + (1-kappa) (CE(z~) + sparse S) (SPEC section 4); with --gloro CE([z, bottom]) alone."""
    if args.gloro:
        return robust
    return kappa * ce + (1 - kappa) * (robust + getattr(args, 'sparse', 0.0) * sparsity)


def _log_batch(logger, args, epoch, i, n, loss, err, robust_loss=None, robust_err=None, eps=None):
    if logger is None or not args.verbose or not (i == 0 or i == n - 1 or (i + 1) % args.verbose == 0):
        return
    line = f'  [{epoch}][{i + 1}/{n}] loss {loss:.4f} err {err:.3f}'
    if robust_loss is not None:
        line += f' eps {eps:.4f} robust loss {robust_loss:.4f} robust err {robust_err:.3f}'
    logger.debug(line)


@torch.no_grad()
def evaluate_clean(model, loader, runtime):
    """Summed over ranks: (clean error, number of examples)."""
    model.eval()
    wrong = total = 0
    for x, y, _ in _progress(loader, runtime, 'clean test'):
        x, y = x.to(runtime.device), y.to(runtime.device)
        wrong += (~local_bound.correct_predictions(model(x), y)).sum().item()
        total += len(y)
    wrong, total = runtime.sum([wrong, total])
    return wrong / max(total, 1), int(total)


@dataclass
class TestStats:
    """What a certification pass over the test set measured (summed or gathered over ranks)."""
    clean_err: float
    certified_err: float
    robust_loss: float
    examples: int
    lipschitz: torch.Tensor      # per-example local Lipschitz products (CPU; with --bound global
                                 # computed for the logs, the certificates used the global one)
    global_lipschitz: float      # product of guaranteed upper bounds of the plain spectral norms (nan: no batch)
    varying: dict                # {activation layer index: mean fraction of varying neurons}
    certified_index: torch.Tensor = None   # dataset indices of the certified examples (all ranks)
    failure_prob: float = None   # guaranteed settings: each certificate fails with at most this
    global_norms: dict = None    # {affine layer: smallest global norm any batch sized its box with}


def certified_batches(model, loader, args, runtime, eps, store=None):
    """Yield ``(x, y, index, BoundOutput)`` for this rank's test batches at ``eps`` (test-time options)."""
    model.eval()
    settings = bound_settings(args, training=False)
    for x, y, index in _progress(loader, runtime, f'certify eps={eps:.4f}'):
        x, y = x.to(runtime.device), y.to(runtime.device)
        with torch.no_grad():       # whoever consumes this: certification builds no autograd graph
            out = local_bound.bound_outputs(model, x, y, eps, settings, store=store, index=index)
        yield x, y, index, out


@torch.no_grad()
def evaluate_certified(model, loader, args, runtime, eps, store=None):
    """Clean and certified error, robust loss, Lipschitz products and varying fractions at ``eps``."""
    wrong = uncertified = loss = total = 0
    products, varying, input_shape, certified_index, failure_prob, global_norms = [], {}, None, [], None, {}
    for x, y, index, out in certified_batches(model, loader, args, runtime, eps, store):
        wrong += (~local_bound.correct_predictions(out.logits, y)).sum().item()
        certified = local_bound.certified_predictions(out, y)
        uncertified += (~certified).sum().item()
        certified_index.append(torch.as_tensor(index)[certified.cpu()])
        failure_prob = out.failure_prob
        for layer, norm in out.global_norms.items():
            global_norms[layer] = min(norm, global_norms.get(layer, math.inf))
        loss += F.cross_entropy(out.worst, y, reduction='sum').item()
        total += len(y)
        local = out.lipschitz
        if args.bound == 'global':      # the metrics compare the local bound with the global one
            local = local_bound.local_lipschitz(model, x, eps, bound_settings(args, training=False))
        products.append(local.float().cpu())
        input_shape = x.shape[1:]
        for layer, fraction in getattr(out, 'varying', {}).items():
            varying[layer] = varying.get(layer, 0.0) + float(fraction.sum())
    layers = sorted(varying)
    # an upper bound (guaranteed global norms), so that local <= global holds in the log; computed
    # once, on the main process, and only when a batch gave the input shape
    global_product = (math.prod(local_bound.guaranteed_global_norms(model, input_shape, CERTIFIED).values())
                      if runtime.is_main and input_shape is not None else 0.0)
    wrong, uncertified, loss, total, global_product, *sums = runtime.sum(
        [wrong, uncertified, loss, total, global_product] + [varying[k] for k in layers])
    if not total:
        global_product = math.nan
    count = max(total, 1)
    return TestStats(wrong / count, uncertified / count, loss / count, int(total),
                     runtime.gather(torch.cat(products) if products else torch.zeros(0)),
                     global_product, {k: v / count for k, v in zip(layers, sums)},
                     runtime.gather(torch.cat(certified_index) if certified_index else torch.zeros(0, dtype=torch.long)),
                     failure_prob, global_norms)


def evaluate_pgd(model, loader, args, runtime):
    """Summed over ranks: error under L2 PGD at ``--epsilon``."""
    model.eval()
    wrong = total = 0
    for x, y, _ in _progress(loader, runtime, 'PGD'):
        x, y = x.to(runtime.device), y.to(runtime.device)
        adv = attacks.pgd(model, x, y, args.epsilon, norm=2, steps=args.niter, step_size=args.alpha,
                          random_start='image', order='clip_project', restarts=args.restarts)
        with torch.no_grad():
            wrong += (~local_bound.correct_predictions(model(adv), y)).sum().item()
        total += len(y)
    wrong, total = runtime.sum([wrong, total])
    return wrong / max(total, 1)


def _plain(net):
    """The nn.Sequential inside a (DDP-wrapped) BoundedModel."""
    return getattr(net, 'module', net).model


# ----------------------------------------------------------------------------- stores

def store_placement(args, runtime, nbytes):
    """(device, pin_memory) for a store of ``nbytes``: the compute device when it fits, else host."""
    choice = getattr(args, 'store_device', 'auto')
    if choice == 'cpu' or runtime.device.type == 'cpu':
        return torch.device('cpu'), runtime.device.type == 'cuda'
    if choice == 'auto':
        free, _ = torch.cuda.mem_get_info(runtime.device)
        if nbytes > 0.5 * free:
            return torch.device('cpu'), True
    return runtime.device, False


def store_dtype(args, runtime):
    """``--store_dtype``; auto = float32, the authors' format (float16 halves memory and traffic but
    its effect on certified error has not been measured; TinyImageNet's scripts default to float16
    as the authors do there)."""
    choice = getattr(args, 'store_dtype', 'auto')
    if choice == 'auto':
        choice = 'float32'
    return {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}[choice]


def make_store(model, args, runtime, size, owned, seed):
    """Per-example store for a data set of ``size`` examples (this rank's share when ``owned``)."""
    if args.bound == 'global':
        return None
    dtype = store_dtype(args, runtime)
    shape = data_load.input_shape(args.data)
    layers = getattr(args, 'indices', None)
    shapes = local_bound.affine_input_shapes(model, shape)
    count = size if owned is None else len(owned)
    per_example = sum(math.prod(s) for i, s in shapes.items() if layers is None or i in layers)
    nbytes = count * per_example * torch.finfo(dtype).bits // 8
    device, pin = store_placement(args, runtime, nbytes)
    return local_bound.SingularVectorStore(model, shape, size, layers=layers, device=device,
                                           dtype=dtype, pin_memory=pin, owned=owned, seed=seed)


class SeededStarts:
    """A store that keeps nothing: every batch draws its start vectors from (seed, example index).

    For evaluation without a store: the figures do not depend on how examples are split into
    ranks and batches. ``layers`` as for SingularVectorStore (None: every layer).
    """

    def __init__(self, model, input_shape, seed, layers=None):
        shapes = local_bound.affine_input_shapes(model, input_shape)
        self.shapes = {i: s for i, s in shapes.items() if layers is None or i in layers}
        self.seed = seed

    def __contains__(self, layer_index):
        return layer_index in self.shapes

    def gather(self, index, device, dtype=torch.float32):
        return {i: u.to(device=device, dtype=dtype)
                for i, u in local_bound.example_normals(self.shapes, index, self.seed).items()}

    def scatter(self, index, vectors):
        """Nothing to keep."""


def evaluation_starts(model, args):
    """SeededStarts for ``args`` (None with ``--bound global``, which needs no start vectors).

    Every layer gets local norms, whatever ``--indices`` says (the authors' evaluation does the
    same: ``--indices`` only limits the training stores)."""
    if args.bound == 'global':
        return None
    return SeededStarts(model, data_load.input_shape(args.data), args.seed)


def checkpoint_path(saved_model):
    """``<saved_model>_best.pth``, or the path itself when it already names a .pth file."""
    return saved_model if saved_model.endswith('.pth') else saved_model + '_best.pth'


def load_for_evaluation(args, runtime, logger):
    """(model, this rank's test loader, seeded start vectors) for ``--saved_model`` and the flags."""
    if args.saved_model is None:
        raise UsageError('--saved_model is required (the prefix of <prefix>_best.pth)')
    path = checkpoint_path(args.saved_model)
    model, state = load_model(path, args.data, args.model, args.init, runtime.device)
    model.eval()
    logger.info(f'{path}: {args.model} on {args.data}'
                + (f", saved at epoch {state['epoch']}" if 'epoch' in state else ''))
    _, test_set = data_load.build_datasets(args.data, args.data_dir, augmentation=False,
                                           normalization=args.normalization)
    loader = test_loader_for(limited(test_set, args.limit_test), args, runtime)
    torch.manual_seed(args.seed)
    return model, loader, evaluation_starts(model, args)


# ----------------------------------------------------------------------------- the run

def _checkpoint(model, optimizer, scheduler, epoch, err, best_err, args):
    return {'state_dict': model.state_dict(), 'err': err, 'epoch': epoch,
            'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
            'best_err': best_err, 'rng': torch.get_rng_state(),
            'cuda_rng': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            'global_vectors': spectral.global_vectors_state(model), 'args': vars(args)}


def _save_epoch(model, optimizer, scheduler, stores, epoch, err, best_err, args, logger):
    """Checkpoint after ``epoch``; from the end of the ramp-up on also keep the best model."""
    full_from = args.warmup + args.rampup
    if epoch >= full_from and err < best_err:
        best_err = err
        atomic_save({'state_dict': model.state_dict(), 'err': err, 'epoch': epoch}, args.prefix + '_best.pth')
        logger.info(f'  best certified error so far: {err:.4f} -> {args.prefix}_best.pth')
    atomic_save(_checkpoint(model, optimizer, scheduler, epoch, err, best_err, args),
                args.prefix + '_checkpoint.pth')
    if args.save_store and any(s is not None for s in stores):
        atomic_save([None if s is None else s.state_dict() for s in stores], args.prefix + '_store.pth')
    return best_err


def _resume(model, optimizer, scheduler, stores, args, runtime, logger):
    """Restore an interrupted run; returns (first epoch to run, best error)."""
    path = args.prefix + '_checkpoint.pth'
    state = load_state(path, map_location=runtime.device)
    if 'optimizer' not in state:
        raise CheckpointError(f'{path} has no optimiser state (not written by this code); cannot --resume')
    load_weights(model, state['state_dict'], path, args.model)
    optimizer.load_state_dict(state['optimizer'])
    scheduler.load_state_dict(state['scheduler'])
    _apply_new_lr(optimizer, scheduler, state.get('args', {}).get('lr'), args.lr, logger)
    torch.set_rng_state(state['rng'].cpu())
    if state.get('cuda_rng') is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda_rng']])
    spectral.load_global_vectors(model, state.get('global_vectors', {}))
    store_path = args.prefix + '_store.pth'
    if os.path.isfile(store_path) and not runtime.distributed:
        for store, saved in zip(stores, load_state(store_path)):
            if store is not None and saved is not None:
                store.load_state_dict(saved)
        logger.info(f'restored singular-vector stores from {store_path}')
    else:
        logger.info('singular-vector stores start afresh (no --save_store file)')
    logger.info(f"resumed from {path}: epoch {state['epoch']} done, best error {state['best_err']:.4f}")
    return state['epoch'] + 1, state['best_err']


def _apply_new_lr(optimizer, scheduler, saved_lr, lr, logger):
    """A --resume with a different --lr rescales the schedule to the new base lr (the usual cure
    after a run stopped on NaN); the schedule's progress is kept."""
    if saved_lr is None or saved_lr == lr:
        return
    for group in optimizer.param_groups:
        group['lr'] *= lr / saved_lr
        group['initial_lr'] = lr
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    logger.info(f'resuming with --lr {lr:g} (the checkpoint was trained with {saved_lr:g})')


def train(args, runtime, logger, train_set=None, test_set=None):
    """Run SPEC section 4 end to end; returns the final report (a dict) on every rank."""
    torch.manual_seed(args.seed)
    local_bound.use_compiled_kernels(getattr(args, 'compile', False))
    train_loader, test_loader, owned_train, owned_test = build_loaders(args, runtime, train_set, test_set)
    model = utils.select_model(args.data, args.model, args.init, runtime.device)
    net = local_bound.BoundedModel(model)
    if runtime.distributed:
        net = DistributedDataParallel(net, device_ids=[runtime.device.index] if runtime.device.type == 'cuda' else None)
    optimizer = utils.make_optimizer(args, model)
    scheduler = utils.make_scheduler(args, optimizer)
    stores = (make_store(model, args, runtime, len(train_loader.dataset), owned_train, args.seed + 1),
              make_store(model, args, runtime, len(test_loader.dataset), owned_test, args.seed + 2))
    _log_start(args, runtime, logger, model, stores)
    if args.save_store and runtime.distributed:
        logger.info('--save_store is off with several processes: each rank holds only its own share')
        args.save_store = False
    start, best_err = 0, math.inf
    if args.resume:
        start, best_err = _resume(model, optimizer, scheduler, stores, args, runtime, logger)
    metrics = None
    if runtime.is_main and args.save:
        metrics = MetricsCSV(args.prefix + '_metrics.csv', activation_layers(model), start)
    for epoch in range(start, args.epochs):
        set_loader_epoch(train_loader, epoch, args.seed + runtime.rank)
        best_err = _run_epoch(net, model, train_loader, test_loader, optimizer, scheduler, stores,
                              args, runtime, logger, epoch, best_err, metrics)
    return final_report(args, runtime, logger, test_loader, stores[1], model)


class MetricsCSV:
    """``<prefix>_metrics.csv``: one row per finished epoch (``plots.py`` reads it).

    Columns: ``METRIC_COLUMNS``, then ``varying_<i>`` (mean fraction of varying neurons at
    activation layer i on the test pass) for every activation layer, then ``time`` (seconds).
    Bound columns stay empty in warm-up epochs. Opening it for a run that starts at epoch k keeps
    the rows of epochs before k and drops later ones, so ``--resume`` never duplicates a row.
    """

    def __init__(self, path, activation_layers, first_epoch):
        self.path = path
        self.columns = list(METRIC_COLUMNS) + [f'varying_{i}' for i in activation_layers] + ['time']
        kept = []
        if first_epoch > 0 and os.path.isfile(path):
            with open(path, newline='') as f:
                kept = [row for row in csv.DictReader(f) if int(row['epoch']) < first_epoch]
        tmp = f'{path}.tmp{os.getpid()}'
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval='', extrasaction='ignore')
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, path)

    def append(self, row):
        with open(self.path, 'a', newline='') as f:
            csv.DictWriter(f, fieldnames=self.columns, restval='', extrasaction='ignore').writerow(row)


METRIC_COLUMNS = ('epoch', 'eps', 'kappa', 'lr', 'loss', 'err', 'robust_loss', 'robust_err', 'test_eps',
                  'test_err', 'test_cert_err', 'lip_local_median', 'lip_local_mean', 'lip_global')


def metrics_row(epoch, eps, kappa, lr, stats, test_eps, test_err, cert_err, test, seconds):
    """One MetricsCSV row (``test`` None in warm-up epochs: no bound columns)."""
    row = dict(epoch=epoch, eps=eps, kappa=kappa, lr=lr, loss=stats.loss, err=stats.error,
               test_eps=test_eps, test_err=test_err, time=round(seconds, 2))
    if test is not None:
        lip = test.lipschitz.double()
        row.update(robust_loss=stats.robust_loss, robust_err=stats.robust_error, test_cert_err=cert_err,
                   lip_local_median=float(lip.median()) if len(lip) else '',
                   lip_local_mean=float(lip.mean()) if len(lip) else '', lip_global=test.global_lipschitz,
                   **{f'varying_{i}': fraction for i, fraction in test.varying.items()})
    return row


def activation_layers(model):
    """Indices of the activation layers of ``model`` (the ones with a bound rule that masks)."""
    return [i for i, layer in enumerate(model)
            if isinstance(layer, (utils.ReLU_x, torch.nn.ReLU, utils.ClampGroupSort))]


def _run_epoch(net, model, train_loader, test_loader, optimizer, scheduler, stores, args, runtime,
               logger, epoch, best_err, metrics=None):
    eps, kappa = utils.epoch_schedule(args, epoch)
    eps_next = utils.epoch_schedule(args, epoch + 1)[0]
    lr = optimizer.param_groups[0]['lr']
    start = time.time()
    if epoch < args.warmup:
        stats = train_clean_epoch(net, train_loader, optimizer, args, runtime, epoch, logger)
        test_err, _ = evaluate_clean(model, test_loader, runtime)
        cert_err, test = 1.0, None
        line = f'clean test err {test_err:.4f}'
    else:
        stats = train_robust_epoch(net, train_loader, optimizer, args, runtime, epoch, eps, kappa,
                                   stores[0], logger)
        test = evaluate_certified(model, test_loader, args, runtime, eps_next, stores[1])
        test_err, cert_err = test.clean_err, test.certified_err
        line = (f'robust loss {stats.robust_loss:.4f} robust err {stats.robust_error:.4f} | '
                f'test err {test_err:.4f} certified err {cert_err:.4f} @ eps {eps_next:.4f}')
        if getattr(args, 'sparse', 0.0):
            line = f'sparsity {stats.sparse_loss:.4f} | {line}'
    scheduler.step()
    logger.info(f'epoch {epoch:4d} | eps {eps:.4f} kappa {kappa:.3f} lr {lr:.2e} | loss {stats.loss:.4f} '
                f'err {stats.error:.4f} | {line} | {time.time() - start:.1f}s')
    if metrics is not None:     # before the checkpoint: a resume rewrites this epoch's row
        metrics.append(metrics_row(epoch, eps, kappa, lr, stats, eps_next, test_err, cert_err, test,
                                   time.time() - start))
    if runtime.is_main and args.save:
        best_err = _save_epoch(model, optimizer, scheduler, stores, epoch, cert_err, best_err, args, logger)
    if runtime.distributed:
        dist.barrier()
    return best_err


def _log_start(args, runtime, logger, model, stores):
    params = sum(p.numel() for p in model.parameters())
    logger.info(f'{args.model} on {args.data}: {params:,} parameters, device {runtime.device}, '
                f'{runtime.world_size} process(es), bound {args.bound}')
    # Every rank reports its own share (the others' loggers are quiet): memory falls as 1/N.
    report = logger.info if runtime.is_main else functools.partial(print, flush=True)
    for name, store in zip(('train', 'test'), stores):
        if store is not None:
            report(f'{name} singular-vector store on rank {runtime.rank}: {store.num_owned:,} examples, '
                   f'{store.nbytes / 2**20:.1f} MiB on {store.device} ({str(store.dtype).split(".")[-1]}), '
                   f'layers {sorted(store.shapes)}')


def final_report(args, runtime, logger, test_loader, test_store, trained=None):
    """Load the best model; clean, PGD and certified error at ``--epsilon``.

    As the authors do, the best weights start their global power iterations from the warm vectors
    of the ``trained`` model (they load the best weights into the model they trained).
    """
    path = args.prefix + '_best.pth'
    if not args.save:
        logger.info('--no_save: no best model to evaluate')
        return {}
    if runtime.distributed:
        dist.barrier()
    model, state = load_model(path, args.data, args.model, args.init, runtime.device)
    if trained is not None:
        spectral.load_global_vectors(model, spectral.global_vectors_state(trained))
    logger.info(f"best model: epoch {state['epoch']}, certified error {state['err']:.4f} during training")
    report = evaluate_all(model, test_loader, reported_settings(args), runtime, logger, store=test_store)
    report['best_epoch'] = state['epoch']
    return report


# How reported certificates are computed (evaluate.py, audit.py, compare.py, the final report after
# training): guaranteed norms (upper bounds with failure probability --failure_prob) and the exact
# last layer, at most 2000 Lanczos steps per norm (settings.CERTIFIED). --spectral lanczos is the
# fast estimate, --spectral power --translation iterative the authors' procedure.
EVALUATION_DEFAULTS = dict(spectral='guaranteed', translation='exact', test_sniter=2000)


def reported_settings(args):
    """``args`` for a certificate meant to be reported: the evaluation defaults (guaranteed norms)
    with at least 2000 steps. The per-epoch test pass keeps ``--spectral``, ``--test_sniter`` and
    its warm per-example store: its figures track training (they are the method's)."""
    settings = argparse.Namespace(**vars(args))
    settings.spectral, settings.translation = EVALUATION_DEFAULTS['spectral'], EVALUATION_DEFAULTS['translation']
    settings.test_sniter = max(args.test_sniter, EVALUATION_DEFAULTS['test_sniter'])
    return settings


def evaluate_all(model, loader, args, runtime, logger, store=None):
    """Clean, PGD and certified error at ``--epsilon``, logged and returned."""
    test = evaluate_certified(model, loader, args, runtime, args.epsilon, store)
    clean_err, cert_err, total = test.clean_err, test.certified_err, test.examples
    pgd_err = evaluate_pgd(model, loader, args, runtime)
    logger.info(f'{total} test examples at eps {args.epsilon:.4f}: clean error {clean_err:.4f} '
                f'(acc {1 - clean_err:.4f}) | PGD error {pgd_err:.4f} (acc {1 - pgd_err:.4f}) | '
                f'certified error {cert_err:.4f} (acc {1 - cert_err:.4f})')
    logger.info('certificates: ' + bound_settings(args, training=False).describe())
    return {'clean_err': clean_err, 'pgd_err': pgd_err, 'certified_err': cert_err, 'examples': total,
            'stats': test}


# ----------------------------------------------------------------------------- entry point

USER_ERRORS = (data_load.DataNotFoundError, CheckpointError, UsageError, local_bound.BoundError)


def main(parse, train_set=None, test_set=None):
    """Parse flags, train, report; user errors end with one line on stderr (exit 2)."""
    args = parse()
    runtime = init_runtime(args.device)
    log_path = args.prefix + '_train.log' if runtime.is_main and args.save else None
    logger = utils.get_logger(log_path, quiet=not runtime.is_main)
    try:
        if runtime.is_main and args.save:
            os.makedirs(os.path.dirname(args.prefix) or '.', exist_ok=True)
            utils.dump_args(args, args.prefix + '_args.json')
            logger.info(f'writing {args.prefix}_{{train.log,metrics.csv,checkpoint.pth,best.pth}}')
        return train(args, runtime, logger, train_set, test_set)
    except USER_ERRORS as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as error:
        logger.debug(f'stopped: {error}')
        print(f'error: {error}. Stopped; {args.prefix}_checkpoint.pth and _best.pth hold the last good '
              'epoch: lower --lr (or fix the data/flags) and rerun with --resume', file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        logger.info(f'interrupted; finished epochs are in {args.prefix}_checkpoint.pth, rerun with --resume')
        sys.exit(130)
    finally:
        close_runtime(runtime)
