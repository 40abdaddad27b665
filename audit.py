"""Audits of the certificates: do they survive strong attacks, and do they hold with converged norms?

    python audit.py --data mnist --model relux --saved_model pretrained/quick_relux --epsilon 1.58 \
        --data_dir ../shared/data/mnist-mini --limit_test 300

Attack audit (this script): every example the project certifies (same flags and settings as
evaluate.py) is attacked at the same eps by L2 PGD with restarts, a targeted PGD towards every
other class and random points of the ball. A certified example whose label is not strictly first
at some attack point is broken: that is a bug of the method's implementation. Exit status 1 then.

Convergence audit (``evaluate.py --audit``, ``convergence_audit`` here): power iteration approaches
every norm from below, so an unconverged one over-certifies. The certified examples are re-certified
with float64 norms converged to 1e-6 (explicit SVD of small layers, Lanczos with full
re-orthogonalisation otherwise) and the exact last-layer solver; the global norms that size the
ball's box are also re-computed and eps is enlarged by their under-estimate, so the re-check can
only be more pessimistic than the truth.
"""
import argparse
import math
import sys
from dataclasses import dataclass, field

import torch

import attacks
import local_bound
import trainer
import utils
from spectral import precise_global_norm


# ----------------------------------------------------------------------------- convergence

@dataclass
class ConvergenceReport:
    certified: int = 0                 # M: examples the evaluation certified
    flipped: int = 0                   # K: of those, not certified with converged norms
    underestimates: list = field(default_factory=list)   # per certified example, relative
    global_underestimate: float = 0.0  # relative under-estimate of the product of global norms

    def lines(self):
        under = torch.tensor(self.underestimates or [0.0])
        return [f'audit: relative under-estimate of the local Lipschitz product over {self.certified} '
                f'certified examples: largest {float(under.max()):.3e}, median {float(under.median()):.3e}; '
                f'global norms: {self.global_underestimate:.3e}',
                f'audit: {self.flipped} of {self.certified} certificates do not hold with converged norms']


def global_underestimate(model, x, eps, options):
    """Relative amount by which the pass's global norms (which size the ball's box) fall short of
    converged ones: ``prod(precise) / prod(pass) - 1``, at least 0."""
    state = local_bound.propagate(model, x[:1], eps, options)
    ratio = 1.0
    for rec in state.records:
        precise = float(precise_global_norm(rec.op)[0])
        ratio *= precise / max(float(rec.global_sigma), 1e-30)
    return max(ratio - 1.0, 0.0)


@torch.no_grad()
def convergence_audit(model, loader, args, runtime, eps, starts=None, rtol=1e-6):
    """Re-certify every certified example with converged norms; returns a ConvergenceReport."""
    report = ConvergenceReport()
    options = trainer.bound_options(args, training=False)
    options['sp_thres'] = None
    widened = None
    for x, y, index, out in trainer.certified_batches(model, loader, args, runtime, eps, starts):
        certified = local_bound.certified_predictions(out, y)
        if not certified.any():
            continue
        if widened is None:
            pass_options = local_bound.PassOptions(sniter=options['sniter'])
            report.global_underestimate = global_underestimate(model, x, eps, pass_options)
            widened = eps * (1.0 + report.global_underestimate)
        xs, ys = x[certified], y[certified]
        precise = local_bound.bound_outputs(
            model, xs, ys, widened, sniter=options['sniter'], opt_iter=1, gloro=options['gloro'],
            bound=options['bound'], method='precise', translation='exact', tol=rtol)
        holds = local_bound.certified_predictions(precise, ys)
        report.certified += len(ys)
        report.flipped += int((~holds).sum())
        ratio = precise.lipschitz.double() / out.lipschitz[certified].double() - 1.0
        report.underestimates += ratio.clamp(min=0).tolist()
    return report


# ----------------------------------------------------------------------------- attacks

@dataclass
class AttackReport:
    certified: int = 0
    broken: int = 0
    smallest_margin: float = math.inf
    broken_indices: list = field(default_factory=list)

    def line(self):
        return (f'audit: {self.broken} of {self.certified} certified examples broken; smallest margin '
                f'found {self.smallest_margin:.4g}')


def smallest_margins(model, x, y, eps, *, steps, restarts, targeted, samples):
    """Per example the smallest logit margin ``z_y - max_{j!=y} z_j`` found in the L2 eps-ball by
    PGD with restarts (the first from the authors' start), multi-targeted PGD and random points."""
    margin = attacks.margins(model, x, y)
    for restart in range(restarts):
        start = 'image' if restart == 0 else 'uniform'
        adv = attacks.pgd(model, x, y, eps, norm=2, steps=steps, step_size=eps / 4, random_start=start)
        margin = torch.minimum(margin, attacks.margins(model, adv, y))
    if targeted:
        adv = attacks.multitarget_pgd(model, x, y, eps, norm=2, steps=steps, step_size=eps / 8)
        margin = torch.minimum(margin, attacks.margins(model, adv, y))
    if samples:
        _, found = attacks.random_search(model, x, y, eps, norm=2, samples=samples)
        margin = torch.minimum(margin, found)
    return margin


def attack_audit(model, loader, args, runtime, eps, starts=None, logger=None):
    """Attack every certified example at ``eps``; returns an AttackReport."""
    report = AttackReport()
    for x, y, index, out in trainer.certified_batches(model, loader, args, runtime, eps, starts):
        certified = local_bound.certified_predictions(out, y)
        if not certified.any():
            continue
        margin = smallest_margins(model, x[certified], y[certified], eps, steps=args.niter,
                                  restarts=args.restarts, targeted=args.targeted, samples=args.samples)
        broken = ~(margin > 0)
        report.certified += int(certified.sum())
        report.broken += int(broken.sum())
        report.smallest_margin = min(report.smallest_margin, float(margin.min()))
        report.broken_indices += torch.as_tensor(index)[certified.cpu()][broken.cpu()].tolist()
        if logger is not None:
            logger.debug(f'  batch: {int(certified.sum())} certified, {int(broken.sum())} broken')
    return report


# ----------------------------------------------------------------------------- command line

def audit_flags(parser):
    g = parser.add_argument_group('attack audit')
    g.add_argument('--targeted', action=argparse.BooleanOptionalAction, default=True,
                   help='also run a targeted PGD towards every other class (multi-targeted)')
    g.add_argument('--samples', type=int, default=100, help='random points of the ball per example')
    parser.set_defaults(restarts=10, niter=100, **trainer.EVALUATION_DEFAULTS)


def parse_args(argv=None):
    args = utils.argparser(argv=argv, extra=audit_flags, data='mnist', model='relux', epsilon=1.58)
    if args.samples < 0:
        sys.exit('error: --samples must be >= 0')
    return args


def main(argv=None):
    """Attack audit of ``--saved_model``; exit status 1 when a certified example is broken."""
    args = parse_args(argv)
    runtime = trainer.init_runtime(args.device)
    logger = utils.get_logger()
    try:
        model, loader, starts = trainer.load_for_evaluation(args, runtime, logger)
        logger.info(f'attacks at eps {args.epsilon:.4f}: PGD {args.niter} steps x {args.restarts} restarts'
                    + (f', targeted PGD {args.niter} steps towards every class' if args.targeted else '')
                    + f', {args.samples} random points')
        report = attack_audit(model, loader, args, runtime, args.epsilon, starts, logger)
    except trainer.USER_ERRORS as error:
        sys.exit(f'error: {error}')
    finally:
        trainer.close_runtime(runtime)
    logger.info(report.line())
    if report.broken:
        logger.info(f'broken examples (test indices): {report.broken_indices[:20]}')
        sys.exit(1)
    return report


if __name__ == '__main__':
    main()
