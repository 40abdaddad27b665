"""Audits of the certificates: do they survive strong attacks, and do they hold with converged norms?

    python audit.py --data mnist --model relux --saved_model pretrained/quick_relux --epsilon 1.58 \
        --data_dir ../shared/data/mnist-mini --limit_test 300

Attack audit (this script): every example the project certifies (same flags and settings as
evaluate.py) is attacked at the same eps by L2 PGD with restarts, a targeted PGD towards every
other class and random points of the ball. A certified example whose label is not strictly first
at some attack point is broken: that is a bug of the method's implementation. Exit status 1 then.

Convergence audit (``evaluate.py --audit``, ``convergence_audit`` here): the certificates the
evaluation reported (the same examples, whatever happened to the model's warm vectors since) are
re-checked with float64 norms converged to 1e-6 (explicit SVD of small layers, Lanczos with full
re-orthogonalisation otherwise) and the exact last-layer solver; the masks are re-derived from
converged global norms and eps is enlarged by the amount the pass's global norms fell short of
them, so the re-check is never more lenient than the reported pass. It shares the pass's own
bookkeeping of masks, so it cannot see a mistake there.

Independent audit (``evaluate.py --audit`` too, ``independent_audit`` here): the same reported
certificates, re-checked by code that shares nothing with the pass. Where every layer's explicit
matrix fits (``reference.DEFAULT_LIMIT`` entries), the float64 reference of ``reference.py`` (its
own interval arithmetic and masks, exact SVDs of the explicit masked matrices, its own last-layer
solver) must confirm each one; for every model, float64 PGD on the logit gap and random points of
the ball and of its sphere must not flip any.
"""
import argparse
import math
import sys
from dataclasses import dataclass, field

import torch

import attacks
import evaluation
import local_bound
import ranks
import reference
import utils


# ----------------------------------------------------------------------------- convergence

@dataclass
class ConvergenceReport:
    certified: int = 0                 # M: certificates the evaluation reported (all re-checked)
    flipped: int = 0                   # K: of those, not certified with converged norms
    checked: list = field(default_factory=list)     # their dataset indices
    products: list = field(default_factory=list)    # converged local Lipschitz products
    global_underestimate: float = 0.0  # relative under-estimate of the pass's global norms

    def lines(self):
        return [f'audit: {self.certified} reported certificates re-checked with converged float64 norms; '
                f'global norms of the pass {self.global_underestimate:.3e} below converged ones',
                f'audit: {self.flipped} of {self.certified} certificates do not hold with converged norms']


def global_underestimate(pass_norms, converged):
    """Relative amount by which the global norms the reported pass used (which size the ball's box;
    the smallest of its batches, ``TestStats.global_norms``) fall short of converged ones:
    ``prod(converged) / prod(pass) - 1``, at least 0."""
    ratio = 1.0
    for index, norm in converged.items():
        ratio *= norm / max(pass_norms.get(index, norm), 1e-30)
    return max(ratio - 1.0, 0.0)


@torch.no_grad()
def convergence_audit(model, loader, args, runtime, eps, reported, rtol=1e-6):
    """Re-check exactly the certificates a reported pass produced (``reported``: its
    ``evaluation.TestStats``, whose ``certified_index`` holds the dataset indices it certified) with
    converged float64 norms; returns a ConvergenceReport.

    The masks are re-derived from converged float64 global norms, at eps widened by the amount the
    reported pass's global norms fell short of them (so the re-check is never more lenient); the
    per-sample norms are converged float64 ones and the last layer is solved exactly. Nothing here
    reads or moves the model's warm vectors."""
    report = ConvergenceReport()
    wanted = set(torch.as_tensor(reported.certified_index).tolist())
    if not wanted:
        return report
    settings = evaluation.bound_settings(args, training=False)
    converged, widened = None, None
    for x, y, index in loader:
        keep = torch.tensor([int(i) in wanted for i in torch.as_tensor(index)], dtype=torch.bool)
        if not keep.any():
            continue
        xs, ys = x[keep].to(runtime.device), y[keep].to(runtime.device)
        if converged is None:
            converged = local_bound.precise_global_norms(model, xs.shape[1:])
            report.global_underestimate = global_underestimate(reported.global_norms, converged)
            widened = eps * (1.0 + report.global_underestimate)
        precise_settings = settings.replace(method='precise', translation='exact', tol=rtol, gloro=False)
        state = local_bound.propagate(model, xs, widened, precise_settings, converged)
        product, _, _ = local_bound.lipschitz_product(state, precise_settings)
        last = list(model)[-1]
        logits = last(state.centre)
        column = local_bound.worst_case_column(last, ys, state, local_bound.per_sample_eps(widened, xs) * product,
                                     precise_settings)
        holds = local_bound.certifies_with(logits, ys, column)
        report.certified += len(ys)
        report.flipped += int((~holds).sum())
        report.checked += [int(i) for i in torch.as_tensor(index)[keep]]
        report.products += product.double().cpu().tolist()
    if report.certified != len(wanted):
        raise RuntimeError(f'convergence audit: found {report.certified} of the {len(wanted)} reported '
                           'certificates in the data (the loader changed between the passes)')
    return report


# ----------------------------------------------------------------------------- independent

@dataclass
class IndependentReport:
    certified: int = 0                 # M: certificates the evaluation reported (all examined)
    reference: str = ''                # why the float64 reference did not apply ('': it checked all M)
    unconfirmed: int = 0               # not confirmed by the reference
    broken: int = 0                    # flipped by a point of the ball
    largest_gap: float = -math.inf     # largest max_{j != y} z_j - z_y the attacks found (>= 0: a flip)
    unconfirmed_indices: list = field(default_factory=list)
    broken_indices: list = field(default_factory=list)

    @property
    def failed(self):
        """Certificates that failed either check (an example may fail both)."""
        return len(set(self.unconfirmed_indices) | set(self.broken_indices))

    def lines(self):
        if self.reference:
            checked = f'audit: the independent float64 reference does not apply ({self.reference}): attacks only'
        else:
            checked = (f'audit: {self.unconfirmed} of {self.certified} certificates not confirmed by the independent '
                       'reference (float64: own interval arithmetic and masks, exact SVDs, exact last layer)')
        return [checked, f'audit: {self.broken} of {self.certified} certified examples broken by float64 PGD and '
                         f'ball sampling; largest logit gap found {self.largest_gap:.4g} (>= 0 breaks)']


def independent_audit(model, loader, eps, reported, *, steps=100, restarts=1, samples=100, seed=0,
                      limit=reference.DEFAULT_LIMIT):
    """Re-check the certificates of a reported pass (``reported.certified_index``: dataset indices)
    with code independent of the pass: the float64 reference (``reference.Reference``, when every
    matrix has at most ``limit`` entries) must certify each, and ``reference.attack_gaps`` (PGD,
    ``steps`` x ``restarts``, and ``samples`` random points, on a float64 copy of the model) must
    find no point of the eps-ball where another class reaches the label. Returns an IndependentReport."""
    report = IndependentReport()
    wanted = set(torch.as_tensor(reported.certified_index).tolist())
    if not wanted:
        return report
    twin, ref = reference.float64_copy(model), None
    for x, y, index in loader:
        keep = torch.tensor([int(i) in wanted for i in torch.as_tensor(index)], dtype=torch.bool)
        if not keep.any():
            continue
        xs, ys, ids = x[keep].cpu(), y[keep].cpu(), torch.as_tensor(index)[keep].tolist()
        if ref is None and not report.reference:
            report.reference = reference.cannot_check(model, xs.shape[1:], limit)
            ref = None if report.reference else reference.Reference(model, xs.shape[1:], limit)
        if ref is not None:
            confirmed = ref.certified(xs, ys, eps)
            report.unconfirmed += int((~confirmed).sum())
            report.unconfirmed_indices += [i for i, ok in zip(ids, confirmed.tolist()) if not ok]
        gaps = reference.attack_gaps(twin, xs, ys, eps, steps=steps, restarts=restarts, samples=samples,
                                     targeted=False, seed=seed)
        report.broken += int((gaps >= 0).sum())
        report.broken_indices += [i for i, gap in zip(ids, gaps.tolist()) if gap >= 0]
        report.largest_gap = max(report.largest_gap, float(gaps.max()))
        report.certified += len(ids)
    if report.certified != len(wanted):
        raise RuntimeError(f'independent audit: found {report.certified} of the {len(wanted)} reported '
                           'certificates in the data (the loader changed between the passes)')
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
    for x, y, index, out in evaluation.certified_batches(model, loader, args, runtime, eps, starts):
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
    parser.set_defaults(restarts=10, niter=100, **evaluation.EVALUATION_DEFAULTS)


def parse_args(argv=None):
    args = utils.argparser(argv=argv, extra=audit_flags, training=False, data='mnist', model='relux', epsilon=1.58)
    if args.samples < 0:
        utils.exit_user_error('--samples must be >= 0')
    return args


def main(argv=None):
    """Attack audit of ``--saved_model``; exit status 1 when a certified example is broken."""
    args = parse_args(argv)
    runtime = ranks.init_runtime(args.device)
    logger = utils.get_logger()
    try:
        evaluation.share_certification_seed(args, runtime)
        model, loader, starts = evaluation.load_for_evaluation(args, runtime, logger)
        logger.info(evaluation.certificates_line(args))
        logger.info(f'attacks at eps {args.epsilon:.4f}: PGD {args.niter} steps x {args.restarts} restarts'
                    + (f', targeted PGD {args.niter} steps towards every class' if args.targeted else '')
                    + f', {args.samples} random points')
        report = attack_audit(model, loader, args, runtime, args.epsilon, starts, logger)
    except evaluation.USER_ERRORS as error:
        utils.exit_user_error(error)
    finally:
        ranks.close_runtime(runtime)
    logger.info(report.line())
    if report.broken:
        logger.info(f'broken examples (test indices): {report.broken_indices[:20]}')
        sys.exit(utils.EXIT_AUDIT_FAILED)
    return report


if __name__ == '__main__':
    main()
