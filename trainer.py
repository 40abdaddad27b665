"""The training procedure of docs/method.md section 4, shared by every training script.

One process or many (``torchrun``, see ``runtime.py``): rank 0 alone writes logs and checkpoints,
metrics are summed over ranks, every rank keeps the per-example singular vectors of its own share
of the data. The epochs, the per-example stores, the run's checkpoints and ``--resume``, the final
report and the entry point live here; evaluation, loaders, checkpoint files and metrics have their
own modules.
"""
import functools
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import data_load
import local_bound
import resume
import spectral
import utils
from checkpoints import NonFiniteError, atomic_save, load_model
from evaluation import (USER_ERRORS, bound_settings, converged_ratios, evaluate_all, evaluate_certified, evaluate_clean,
                        reported_settings, share_certification_seed)
from loaders import build_loaders, set_loader_epoch
from metrics import MetricsCSV, metrics_row
from ranks import close_runtime, init_runtime, progress


# ----------------------------------------------------------------------------- processes


# ----------------------------------------------------------------------------- data


# ----------------------------------------------------------------------------- checkpoints

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


def train_clean_epoch(net, loader, optimizer, args, runtime, epoch, logger):
    """Warm-up epoch: plain cross-entropy (autocast, with loss scaling for fp16, when ``--amp``)."""
    net.train()
    sums, count = [0.0] * 5, 0
    amp = getattr(args, 'amp', False)
    autocast = torch.autocast(runtime.device.type, dtype=_amp_dtype(runtime), enabled=amp)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=amp and _amp_dtype(runtime) == torch.float16)
    for i, (x, y, _) in enumerate(progress(loader, runtime, f'epoch {epoch} (clean)')):
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
    for i, (x, y, index) in enumerate(progress(loader, runtime, f'epoch {epoch}')):
        eps_i, kappa_i = utils.batch_schedule(args, eps, kappa, i, len(loader))
        x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
        logits, worst, _, sparsity = net(x, y, eps_i, settings, store=store, index=index)
        ce = F.cross_entropy(logits, y)
        robust = F.cross_entropy(worst, y)
        loss = robust_objective(ce, robust, sparsity, kappa_i, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        local_bound.project_parameters(_plain(net))
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
    """kappa CE(z) + (1-kappa) (CE(z~) + sparse S) (docs/method.md §4); with --gloro CE([z, bottom]) alone."""
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


# ----------------------------------------------------------------------------- the run

def _checkpoint(model, optimizer, scheduler, epoch, err, best_err, args):
    return {'state_dict': model.state_dict(), 'err': err, 'epoch': epoch,
            'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
            'best_err': best_err, 'rng': torch.get_rng_state(),
            'cuda_rng': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            'global_vectors': spectral.global_vectors_state(model), 'args': vars(args)}


@dataclass
class Run:
    """What a training run works on, built and checked before it writes anything, and how far it
    got (for the line an interruption prints)."""
    train_loader: object
    test_loader: object
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    stores: tuple
    policy: resume.StorePolicy
    checkpoint: dict = None         # --resume: the checkpoint read (already loaded into the above)
    stage: str = 'before training began'    # where the run is now, for that line
    saved_epoch: int = None         # the last epoch whose checkpoint this run wrote


def prepare(args, runtime, train_set=None, test_set=None):
    """Seed, build and check everything the flags name (data, model, stores, --resume's checkpoint);
    user errors raise here, before the run writes any file. Returns the Run."""
    torch.manual_seed(args.seed)
    train_loader, test_loader, owned_train, owned_test = build_loaders(args, runtime, train_set, test_set)
    model = utils.select_model(args.data, args.model, args.init, runtime.device)
    net = local_bound.BoundedModel(model)
    if runtime.distributed:
        net = DistributedDataParallel(net, device_ids=[runtime.device.index] if runtime.device.type == 'cuda' else None)
    optimizer = utils.make_optimizer(args, model)
    scheduler = utils.make_scheduler(args, optimizer)
    stores = (make_store(model, args, runtime, len(train_loader.dataset), owned_train, args.seed + 1),
              make_store(model, args, runtime, len(test_loader.dataset), owned_test, args.seed + 2))
    run = Run(train_loader, test_loader, model, net, optimizer, scheduler, stores,
              resume.store_policy(args, runtime, stores))
    if args.resume:
        run.checkpoint = resume.read_checkpoint(args.prefix + '_checkpoint.pth', model, optimizer, scheduler, args)
    return run


def _save_epoch(run, epoch, err, best_err, args, logger):
    """Checkpoint after ``epoch`` (with the stores when the run keeps them); from the end of the
    ramp-up on also keep the best model."""
    model = run.model
    full_from = args.warmup + args.rampup
    if epoch >= full_from and err < best_err:
        best_err = err
        atomic_save({'state_dict': model.state_dict(), 'err': err, 'epoch': epoch}, args.prefix + '_best.pth')
        logger.info(f'  best certified error so far: {err:.4f} -> {args.prefix}_best.pth')
    if run.policy.keep:
        resume.save_stores(run.stores, epoch, args.prefix + '_store.pth')
    atomic_save(_checkpoint(model, run.optimizer, run.scheduler, epoch, err, best_err, args),
                args.prefix + '_checkpoint.pth')
    run.saved_epoch = epoch
    return best_err


def _resume(run, args, runtime, logger):
    """Continue from the checkpoint ``prepare`` read: lr, RNG, global vectors, and the per-example
    stores (restored when kept for this epoch, else re-warmed). Returns (first epoch, best error)."""
    state = run.checkpoint
    _apply_new_lr(run.optimizer, run.scheduler, state.get('args', {}).get('lr'), args.lr, logger)
    resume.restore_rng(state)
    spectral.load_global_vectors(run.model, state.get('global_vectors', {}))
    start = state['epoch'] + 1
    store_path = args.prefix + '_store.pth'
    why = resume.restore_stores(run.stores, state['epoch'], store_path) if run.policy.keep else run.policy.reason
    if why is None:
        logger.info(f'restored the per-example stores from {store_path}')
    elif any(s is not None for s in run.stores):
        logger.info(f'per-example stores not restored ({why})')
        means = resume.warm_stores(run.model, (run.train_loader, run.test_loader), run.stores, args, runtime, start)
        logger.info(resume.warm_line(means))
    logger.info(f"resumed from {args.prefix}_checkpoint.pth: epoch {state['epoch']} done, best error "
                f"{state['best_err']:.4f}")
    return start, state['best_err']


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


def train(run, args, runtime, logger):
    """Run docs/method.md §4 end to end on a prepared ``run``; returns the final report (a dict) on
    every rank."""
    _log_start(args, runtime, logger, run)
    start, best_err = 0, math.inf
    if run.checkpoint is not None:
        start, best_err = _resume(run, args, runtime, logger)
    metrics = None
    if runtime.is_main and args.save:
        metrics = MetricsCSV(args.prefix + '_metrics.csv', local_bound.activation_layers(run.model), start)
    for epoch in range(start, args.epochs):
        run.stage = f'in epoch {epoch}'
        set_loader_epoch(run.train_loader, epoch, args.seed + runtime.rank)
        best_err = _run_epoch(run, args, runtime, logger, epoch, best_err, metrics)
    run.stage = 'in the final evaluation'
    return final_report(args, runtime, logger, run.test_loader, run.stores[1], run.model)


def _run_epoch(run, args, runtime, logger, epoch, best_err, metrics=None):
    net, model, optimizer, stores = run.net, run.model, run.optimizer, run.stores
    train_loader, test_loader = run.train_loader, run.test_loader
    eps, kappa = utils.epoch_schedule(args, epoch)
    eps_next = utils.epoch_schedule(args, epoch + 1)[0]
    lr = optimizer.param_groups[0]['lr']
    start, ratios = time.time(), None
    if epoch < args.warmup:
        stats = train_clean_epoch(net, train_loader, optimizer, args, runtime, epoch, logger)
        test_err, _ = evaluate_clean(model, test_loader, runtime)
        cert_err, test = 1.0, None
        line = f'clean test err {test_err:.4f}'
    else:
        stats = train_robust_epoch(net, train_loader, optimizer, args, runtime, epoch, eps, kappa,
                                   stores[0], logger)
        test = evaluate_certified(model, test_loader, args, runtime, eps_next, stores[1])
        if getattr(args, 'tightness', 0) and runtime.is_main:
            ratios = converged_ratios(model, test_loader, args, runtime, eps_next, args.tightness)
        test_err, cert_err = test.clean_err, test.certified_err
        line = (f'robust loss {stats.robust_loss:.4f} robust err {stats.robust_error:.4f} | '
                f'test err {test_err:.4f} certified err {cert_err:.4f} @ eps {eps_next:.4f}')
        if getattr(args, 'sparse', 0.0):
            line = f'sparsity {stats.sparse_loss:.4f} | {line}'
    run.scheduler.step()
    logger.info(f'epoch {epoch:4d} | eps {eps:.4f} kappa {kappa:.3f} lr {lr:.2e} | loss {stats.loss:.4f} '
                f'err {stats.error:.4f} | {line} | {time.time() - start:.1f}s')
    if metrics is not None:     # before the checkpoint: a resume rewrites this epoch's row
        metrics.append(metrics_row(epoch, eps, kappa, lr, stats, eps_next, test_err, cert_err, test,
                                   time.time() - start, args.bound, ratios))
    if runtime.is_main and args.save:
        best_err = _save_epoch(run, epoch, cert_err, best_err, args, logger)
    if runtime.distributed:
        dist.barrier()
    return best_err


def _log_start(args, runtime, logger, run):
    params = sum(p.numel() for p in run.model.parameters())
    logger.info(f'{args.model} on {args.data}: {params:,} parameters, device {runtime.device}, '
                f'{runtime.world_size} process(es), bound {args.bound}')
    # Every rank reports its own share (the others' loggers are quiet): memory falls as 1/N.
    report = logger.info if runtime.is_main else functools.partial(print, flush=True)
    for name, store in zip(('train', 'test'), run.stores):
        if store is not None:
            report(f'{name} singular-vector store on rank {runtime.rank}: {store.num_owned:,} examples, '
                   f'{store.nbytes / 2**20:.1f} MiB on {store.device} ({str(store.dtype).split(".")[-1]}), '
                   f'layers {list(store.shapes)}')
    if args.save and any(s is not None for s in run.stores):
        logger.info(f'per-example stores kept with every checkpoint in {args.prefix}_store.pth ({run.policy.reason})'
                    if run.policy.keep else
                    f'per-example stores not kept ({run.policy.reason}); --resume re-warms them')


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


# ----------------------------------------------------------------------------- entry point


def main(parse, train_set=None, test_set=None):
    """Parse flags, check the run, train, report; user errors end with one line on stderr (exit 2)
    and, found before training starts, leave every file as it was."""
    args = parse()
    runtime = init_runtime(args.device)
    logger = utils.get_logger(None, quiet=not runtime.is_main)
    run = None
    try:
        with local_bound.compiled_kernels(getattr(args, 'compile', False)):
            run = prepare(args, runtime, train_set, test_set)
            logger = _start_files(args, runtime)
            share_certification_seed(args, runtime)
            return train(run, args, runtime, logger)
    except USER_ERRORS as error:
        utils.exit_user_error(error)
    except NonFiniteError as error:
        logger.debug(f'stopped: {error}')
        print(f'error: {error}. Stopped; {args.prefix}_checkpoint.pth and _best.pth hold the last good '
              'epoch: lower --lr (or fix the data/flags) and rerun with --resume', file=sys.stderr)
        sys.exit(utils.EXIT_DIVERGED)
    except KeyboardInterrupt:
        logger.info(resume.interrupt_line(args.prefix, run, args.save))
        sys.exit(130)
    finally:
        close_runtime(runtime)


def _start_files(args, runtime):
    """The logger of a checked run; on the main process with saving: its log file and _args.json."""
    if not (runtime.is_main and args.save):
        return utils.get_logger(None, quiet=not runtime.is_main)
    note = None if args.resume else resume.fresh_run_note(args.prefix)
    logger = utils.get_logger(args.prefix + '_train.log')
    utils.dump_args(args, args.prefix + '_args.json')
    logger.info(f'writing {args.prefix}_{{train.log,metrics.csv,checkpoint.pth,best.pth}}')
    if note is not None:
        logger.info(note)
    return logger
