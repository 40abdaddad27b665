"""What an interrupted training run keeps and how ``--resume`` gets it back.

The per-epoch checkpoint (``<prefix>_checkpoint.pth``: weights, optimiser, lr schedule, RNG, global
power-iteration vectors, best error) is always written. The per-example singular-vector stores
(``local_bound.SingularVectorStore``: warm start vectors of the masked power iteration) are kept
too, in ``<prefix>_store.pth`` with every checkpoint, when ``--save_store`` says so (``auto``: in one
process and up to ``STORE_KEEP_LIMIT`` bytes); then ``--resume`` repeats the uninterrupted run bit
for bit. Otherwise ``--resume`` re-warms fresh stores (``warm_stores``) before training continues:
stores started afresh would under-estimate every local bound for several epochs, and training
against them ruins the certified accuracy.
"""
import os
from dataclasses import dataclass

import torch

import local_bound
import spectral
import utils
from checkpoints import CheckpointError, atomic_save, load_state, load_weights
from evaluation import bound_settings
from ranks import progress

STORE_KEEP_LIMIT = 2 * 2**30   # --save_store auto keeps stores of at most this many bytes
WARM_PASSES = 30               # at most this many re-warming passes over the data (each about a third of an epoch)
WARM_GROWTH = 0.01             # ... stopping once a pass raises the mean bound by less than this


@dataclass
class StorePolicy:
    """Whether this run keeps its stores with every checkpoint, and why (for the log lines)."""
    keep: bool
    reason: str


def store_policy(args, runtime, stores):
    """``--save_store`` (always / never / auto) for these stores in this run."""
    nbytes = sum(s.nbytes for s in stores if s is not None)
    size = f'{nbytes / 2**20:,.0f} MiB'
    if nbytes == 0:
        return StorePolicy(False, 'no per-example stores (--bound global)')
    if runtime.distributed:
        return StorePolicy(False, f'{runtime.world_size} processes each hold a share of the stores')
    if args.save_store == 'never':
        return StorePolicy(False, f'--save_store never; {size}')
    if args.save_store == 'auto' and nbytes > STORE_KEEP_LIMIT:
        return StorePolicy(False, f'{size}, above the {STORE_KEEP_LIMIT / 2**30:g} GiB of --save_store auto')
    return StorePolicy(True, size)


def save_stores(stores, epoch, path):
    """Write the stores as they are after ``epoch`` (atomic)."""
    atomic_save({'epoch': epoch, 'stores': [None if s is None else s.state_dict() for s in stores]}, path)


def restore_stores(stores, epoch, path):
    """Load ``path`` into ``stores`` when it holds them as they were after ``epoch``; returns why
    not (a short phrase) or None when restored. A missing, unreadable or other epoch's file is not
    an error: the stores are then re-warmed."""
    if not os.path.isfile(path):
        return f'no {path}'
    try:
        saved = load_state(path)
    except CheckpointError as error:
        return str(error)
    if not isinstance(saved, dict) or saved.get('epoch') != epoch:
        return f'{path} is not from epoch {epoch}'
    try:
        for store, state in zip(stores, saved['stores']):
            if store is not None and state is not None:
                store.load_state_dict(state)
    except (KeyError, ValueError) as error:
        return f'{path} does not fit this run ({error})'
    return None


def read_checkpoint(path, model, optimizer, scheduler, args):
    """Load ``--resume``'s checkpoint into the model, optimiser and schedule (a CheckpointError when
    it is missing or does not fit; nothing is written). Returns the checkpoint dict."""
    state = load_state(path, map_location=next(model.parameters()).device)
    if 'optimizer' not in state:
        raise CheckpointError(f'{path} has no optimiser state (not written by this code); cannot --resume')
    load_weights(model, state['state_dict'], path, args.model)
    try:
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
    except (KeyError, ValueError) as error:
        raise CheckpointError(f'{path}: its optimiser state does not fit --opt {args.opt} ({error})') from error
    return state


def restore_rng(state):
    """The RNG streams of the checkpoint (CPU, and CUDA when there is one)."""
    torch.set_rng_state(state['rng'].cpu())
    if state.get('cuda_rng') is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda_rng']])


# ----------------------------------------------------------------------------- re-warming

def warm_passes(args, epoch):
    """How many passes may re-warm the stores before ``epoch``: one per robust epoch done (each
    epoch gave every example one warm-started pass), at most WARM_PASSES."""
    return max(0, min(epoch - args.warmup, WARM_PASSES))


def _mean_bound(model, loader, settings, eps, store, runtime, desc):
    """One no-grad pass of the bound with ``store`` (read and written back); the mean local
    Lipschitz estimate over every rank's examples."""
    total = count = 0.0
    for x, y, index in progress(loader, runtime, desc):
        x, y = x.to(runtime.device), y.to(runtime.device)
        out = local_bound.bound_outputs(model, x, y, eps, settings, store=store, index=index)
        total += float(out.lipschitz.detach().double().sum())
        count += len(y)
    total, count = runtime.sum([total, count])
    return total / max(count, 1)


def _warm_one(model, loader, settings, eps, store, runtime, passes, name):
    """Passes of ``settings``' power iteration over ``loader`` until the mean bound grows by less
    than WARM_GROWTH (power-iteration estimates only grow as the vectors converge); the means."""
    means = []
    for k in range(passes):
        means.append(_mean_bound(model, loader, settings, eps, store, runtime, f're-warm {name} store ({k + 1})'))
        if k and means[-1] <= means[-2] * (1 + WARM_GROWTH):
            break
    return means


@torch.no_grad()
def warm_stores(model, loaders, stores, args, runtime, epoch):
    """Re-warm fresh stores before training continues at ``epoch`` (see ``warm_passes``), at the
    eps of that epoch: the training store with training's iterations per pass, the test store with
    the test pass's (``--test_sniter``; not at all when that pass uses guaranteed norms, which never
    read a store). RNG streams and the global power-iteration vectors are left as they were.
    Returns {store name: means of the passes}."""
    passes = warm_passes(args, epoch)
    eps = utils.epoch_schedule(args, epoch)[0]
    plans = [('train', bound_settings(args, training=True)), ('test', bound_settings(args, training=False))]
    vectors = {i: u.clone() for i, u in spectral.global_vectors_state(model).items()}
    devices = [runtime.device] if runtime.device.type == 'cuda' else []
    means = {}
    model.eval()
    with torch.random.fork_rng(devices=devices):
        for (name, settings), loader, store in zip(plans, loaders, stores):
            if passes and store is not None and not settings.guaranteed:
                means[name] = _warm_one(model, loader, settings, eps, store, runtime, passes, name)
    spectral.load_global_vectors(model, vectors)
    return means


def warm_line(means):
    """The log line of ``warm_stores``' result."""
    if not means:
        return 'per-example stores start afresh (no robust epoch done yet)'
    parts = [f"{name}: {len(m)} pass{'es' if len(m) > 1 else ''}, mean bound "
             + ' -> '.join(f'{v:.4g}' for v in m) for name, m in means.items()]
    return 'per-example stores re-warmed before training continues (' + '; '.join(parts) + ')'


# ----------------------------------------------------------------------------- interruption

def interrupt_line(prefix, run, save=True):
    """What Ctrl-C leaves: the last finished epoch's checkpoint, whether the stores are kept, and
    how to continue. ``run``: the trainer's Run (None: stopped while it was being built)."""
    where = 'before training began' if run is None else run.stage
    saved_epoch = None if run is None else run.saved_epoch
    if not save:
        return f'interrupted {where}; --no_save: nothing was kept'
    if saved_epoch is None:
        return (f'interrupted {where}; no epoch of this run finished, so it wrote no checkpoint '
                f'({prefix}_checkpoint.pth, if there, is an earlier one): rerun to start again')
    kept = (f'the per-example stores of epoch {saved_epoch} in {prefix}_store.pth' if run.policy.keep
            else f'not the per-example stores ({run.policy.reason}): --resume re-warms them with up to '
                 f'{WARM_PASSES} passes over the data first')
    return (f'interrupted {where}; kept: epochs 0-{saved_epoch} in {prefix}_checkpoint.pth (weights, '
            f'optimiser, lr schedule, RNG, best error) and {kept}; continue with the same command '
            f'plus --resume')


def fresh_run_note(prefix):
    """A line when a run without --resume is about to replace an earlier run's checkpoint, else None."""
    path = prefix + '_checkpoint.pth'
    if os.path.isfile(path):
        return f'{path} of an earlier run is replaced after the first epoch (--resume continues it instead)'
    return None

