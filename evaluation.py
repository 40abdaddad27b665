"""Evaluation of a model: clean, PGD and certified error on a test loader, with the settings of the
flags (``bound_settings``); what reported certificates use (``EVALUATION_DEFAULTS``); loading a
saved model for evaluation."""
import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import attacks
import data_load
import guaranteed
import local_bound
from checkpoints import CheckpointError, checkpoint_path, load_model
from loaders import limited, test_loader_for
from ranks import progress
from settings import LANCZOS, BoundSettings
from utils import UsageError


def bound_settings(args, training):
    """The ``BoundSettings`` of the flags for training (the authors' warm power iteration and
    clip-and-rescale, with the sparsity term when ``--sparse``) or test time (``--spectral``,
    ``--translation``, ``--test_sniter``, ``--test_opt_iter``, ``--failure_prob``; the guaranteed
    norms seeded by ``--cert_seed`` for reported certificates, by ``--seed`` in the per-epoch pass)."""
    method = 'power' if training else getattr(args, 'spectral', 'power')
    return BoundSettings(
        method=method, sniter=args.sniter if training else args.test_sniter,
        opt_iter=args.opt_iter if training else args.test_opt_iter, gloro=args.gloro, bound=args.bound,
        translation='iterative' if training else test_translation(args, method),
        sp_thres=getattr(args, 'sp_thres', None) if training and getattr(args, 'sparse', 0) else None,
        power_grad=getattr(args, 'power_grad', 'unrolled') if method == 'power' else 'unrolled',
        failure_prob=getattr(args, 'failure_prob', 1e-9), seed=certification_seed(args))


def certification_seed(args):
    """The seed of the guaranteed norms for the flags: ``--cert_seed`` where the certificates are
    reported (``args.reporting``, set by ``utils.argparser`` and ``reported_settings``), else ``--seed``."""
    return args.cert_seed if getattr(args, 'reporting', False) else args.seed


def certificates_line(args):
    """The log line saying how the certificates of the flags are computed, with the seed to repeat them."""
    settings = bound_settings(args, training=False)
    line = 'certificates: ' + settings.describe()
    if settings.guaranteed and getattr(args, 'reporting', False) and getattr(args, 'cert_seed_drawn', False):
        line += f' (drawn from the OS; --cert_seed {args.cert_seed} repeats this run)'
    return line


def share_certification_seed(args, runtime):
    """Every process certifies with the main process's ``--cert_seed`` (each drew its own)."""
    args.cert_seed = runtime.shared(args.cert_seed)


def test_translation(args, method):
    """The test-time last-layer solver: ``--translation``, else exact for guaranteed norms (which
    need it) and the authors' iterative one for the estimates."""
    chosen = getattr(args, 'translation', None)
    return chosen if chosen is not None else ('exact' if method == 'guaranteed' else 'iterative')


# How reported certificates are computed (evaluate.py, audit.py, compare.py, the final report after
# training): guaranteed norms (upper bounds with failure probability --failure_prob) and the exact
# last layer, at most 2000 Lanczos steps per norm (settings.CERTIFIED). --spectral lanczos is the
# fast estimate, --spectral power --translation iterative the authors' procedure.
EVALUATION_DEFAULTS = dict(spectral='guaranteed', translation=None, test_sniter=2000)


def reported_settings(args):
    """``args`` for a certificate meant to be reported: the evaluation defaults (guaranteed norms)
    with at least 2000 steps. The per-epoch test pass keeps ``--spectral``, ``--test_sniter`` and
    its warm per-example store: its figures track training (they are the method's). Their
    guaranteed norms start from ``--cert_seed`` (``certification_seed``)."""
    settings = argparse.Namespace(**vars(args))
    settings.reporting = True
    settings.spectral, settings.translation = EVALUATION_DEFAULTS['spectral'], 'exact'
    settings.test_sniter = max(args.test_sniter, EVALUATION_DEFAULTS['test_sniter'])
    return settings


@torch.no_grad()
def evaluate_clean(model, loader, runtime):
    """Summed over ranks: (clean error, number of examples)."""
    model.eval()
    wrong = total = 0
    for x, y, _ in progress(loader, runtime, 'clean test'):
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
    global_lipschitz: float      # product of the global norms, of the kind of the local products
                                 # (``logged_global_product``; nan: no batch)
    varying: dict                # {activation layer index: mean fraction of varying neurons}
    certified_index: torch.Tensor = None   # dataset indices of the certified examples (all ranks)
    failure_prob: float = None   # guaranteed settings: each certificate fails with at most this
    global_norms: dict = None    # {affine layer: smallest global norm any batch sized its box with}


def certified_batches(model, loader, args, runtime, eps, store=None):
    """Yield ``(x, y, index, BoundOutput)`` for this rank's test batches at ``eps`` (test-time options)."""
    model.eval()
    settings = bound_settings(args, training=False)
    for x, y, index in progress(loader, runtime, f'certify eps={eps:.4f}'):
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
    layers = sorted(varying, key=local_bound.key_order)
    # computed once, on the main process, and only when a batch gave the input shape
    global_product = (logged_global_product(model, input_shape, bound_settings(args, training=False))
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


@torch.no_grad()
def converged_ratios(model, loader, args, runtime, eps, count):
    """Per example of this rank's first ``count`` test examples: the local (or refined, with --bound
    refined) product from converged Lanczos estimates over the float64 converged global product,
    like with like (the test pass's own products are a warm power-iteration estimate and a guaranteed
    upper bound). A CPU float64 tensor."""
    model.eval()
    settings = LANCZOS.replace(bound='refined' if args.bound == 'refined' else 'local', seed=args.seed)
    local, shape = [], None
    for x, _, _ in loader:
        x = x[:count - sum(len(v) for v in local)].to(runtime.device)
        local.append(local_bound.local_lipschitz(model, x, eps, settings).double().cpu())
        shape = x.shape[1:]
        if sum(len(v) for v in local) >= count:
            break
    if shape is None:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(local) / math.prod(local_bound.precise_global_norms(model, shape).values())


# Lanczos steps of the logged global estimates (each within about 1% of its norm, cheap enough for
# every epoch's test pass)
GLOBAL_ESTIMATE_STEPS = 128


def logged_global_product(model, input_shape, settings):
    """The global product logged beside the local products, of their kind: with guaranteed
    ``settings`` the pass's own upper bounds (remembered, not recomputed; the local norms are capped
    by them, so local <= global), with estimates estimates from below (``guaranteed.global_norm_estimate``:
    exact for small layers, else ``GLOBAL_ESTIMATE_STEPS`` Lanczos steps seeded by ``settings.seed``;
    no warm vector moves, so training runs as it would without the log)."""
    if settings.guaranteed:
        return local_bound.global_product(model, input_shape, settings)
    return local_bound.composed(model, {
        key: guaranteed.global_norm_estimate(local_bound.make_operator(layer, shape), GLOBAL_ESTIMATE_STEPS,
                                             local_bound.layer_seed(settings.seed, key))
        for key, (layer, shape) in local_bound.affine_layers(model, input_shape).items()})


def evaluate_pgd(model, loader, args, runtime):
    """Summed over ranks: error under L2 PGD at ``--epsilon``."""
    model.eval()
    wrong = total = 0
    for x, y, _ in progress(loader, runtime, 'PGD'):
        x, y = x.to(runtime.device), y.to(runtime.device)
        adv = attacks.pgd(model, x, y, args.epsilon, norm=2, steps=args.niter, step_size=args.alpha,
                          random_start='image', order='clip_project', restarts=args.restarts)
        with torch.no_grad():
            wrong += (~local_bound.correct_predictions(model(adv), y)).sum().item()
        total += len(y)
    wrong, total = runtime.sum([wrong, total])
    return wrong / max(total, 1)


def evaluate_all(model, loader, args, runtime, logger, store=None):
    """Clean, PGD and certified error at ``--epsilon``, logged and returned."""
    test = evaluate_certified(model, loader, args, runtime, args.epsilon, store)
    clean_err, cert_err, total = test.clean_err, test.certified_err, test.examples
    pgd_err = evaluate_pgd(model, loader, args, runtime)
    logger.info(f'{total} test examples at eps {args.epsilon:.4f}: clean error {clean_err:.4f} '
                f'(acc {1 - clean_err:.4f}) | PGD error {pgd_err:.4f} (acc {1 - pgd_err:.4f}) | '
                f'certified error {cert_err:.4f} (acc {1 - cert_err:.4f})')
    logger.info(certificates_line(args))
    return {'clean_err': clean_err, 'pgd_err': pgd_err, 'certified_err': cert_err, 'examples': total,
            'stats': test}


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


def load_for_evaluation(args, runtime, logger):
    """(model, this rank's test loader, seeded start vectors) for ``--saved_model`` and the flags."""
    if args.saved_model is None:
        raise UsageError('--saved_model is required (a checkpoint: its prefix, as in pretrained/x for pretrained/x_best.pth, or the .pth file)')
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


USER_ERRORS = (data_load.DataNotFoundError, CheckpointError, UsageError, local_bound.BoundError)
