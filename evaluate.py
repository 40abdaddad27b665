"""Clean, PGD and certified error of a saved model (ours or the authors' checkpoints).

    python evaluate.py --data cifar10 --model c6f2_relux --epsilon 0.141 --test_sniter 2000 \
        --saved_model pretrained/relu/cifar_6C2F
"""
import sys

import audit
import data_load
import empirical
import evaluation
import norms
import radius
import ranks
import utils


def extra_flags(parser):
    """evaluate.py's flags; certificates default to ``evaluation.EVALUATION_DEFAULTS`` (guaranteed
    norms, 2000 steps at most, the exact last layer); ``--spectral power --translation iterative``
    is the authors' procedure, ``--spectral lanczos`` a fast estimate."""
    parser.set_defaults(**evaluation.EVALUATION_DEFAULTS)
    parser.add_argument('--no_pgd', action='store_true', help='skip the PGD attack')
    parser.add_argument('--audit', action='store_true',
                        help='re-check exactly the certificates this evaluation reported: with converged float64 '
                             'norms (1e-6) re-deriving the masks and the exact last-layer solver, with the '
                             'independent float64 reference (reference.py; models whose matrices fit) and with '
                             'float64 PGD (--niter steps, --restarts) and ball sampling; prints how many fail')
    parser.add_argument('--strict', action='store_true', help='with --audit: exit 1 when one fails')
    g = parser.add_argument_group('certified radius and empirical Lipschitzness')
    g.add_argument('--radius', action='store_true',
                   help="bisect each test example's largest certified eps; writes <saved_model>_radius.csv")
    g.add_argument('--radius_max', type=float, default=None, help='largest eps searched (default: 3 x --epsilon)')
    g.add_argument('--radius_tol', type=float, default=1e-3, help='bisection tolerance relative to the radius: the reported radius r is certified, (1 + tol) r is not')
    g.add_argument('--empirical_lip', action='store_true',
                   help='empirical local Lipschitzness (Yang et al. 2020) of the logits, both the maximisation '
                        'and the published descent; writes <saved_model>_lipschitz.csv')
    g.add_argument('--lip_eps', type=float, default=None,
                   help='half-width of the L-inf box it searches (default: mnist 0.1, else 0.031)')
    g.add_argument('--lip_norm', choices=['inf', '2', '1'], default='inf', help='norm of the input change')


def parse_args(argv=None, extra=None, **defaults):
    """The flags of utils.argparser plus this script's; ``extra``/``defaults`` as there."""
    def flags(parser):
        extra_flags(parser)
        if extra is not None:
            extra(parser)
    return utils.argparser(argv=argv, extra=flags, training=False,
                           **{'data': 'cifar10', 'model': 'c6f2_relux', **defaults})


def main(argv=None, parse=parse_args):
    """Evaluate ``--saved_model`` with the flags ``parse(argv)`` returns (one process or torchrun)."""
    args = parse(argv)
    runtime = ranks.init_runtime(args.device)
    logger = utils.get_logger(quiet=not runtime.is_main)
    try:
        evaluation.share_certification_seed(args, runtime)
        model, loader, starts = evaluation.load_for_evaluation(args, runtime, logger)
        if args.no_pgd:
            stats = evaluation.evaluate_certified(model, loader, args, runtime, args.epsilon, starts)
            logger.info(f'{stats.examples} test examples at eps {args.epsilon:.4f}: clean error '
                        f'{stats.clean_err:.4f} | certified error {stats.certified_err:.4f} '
                        f'(acc {1 - stats.certified_err:.4f})')
            logger.info(evaluation.certificates_line(args))
            result = {'clean_err': stats.clean_err, 'certified_err': stats.certified_err,
                      'examples': stats.examples, 'stats': stats}
        else:
            result = evaluation.evaluate_all(model, loader, args, runtime, logger, store=starts)
        if args.audit:
            result['audit'] = run_convergence_audit(model, loader, args, runtime, logger, result['stats'])
            result['independent'] = run_independent_audit(model, loader, args, logger, result['stats'])
        if args.radius:
            result['radius'] = run_radius(model, loader, args, runtime, logger, starts)
        if args.empirical_lip:
            result['empirical_lip'] = run_empirical_lip(model, loader, args, runtime, logger)
    except evaluation.USER_ERRORS as error:
        utils.exit_user_error(error)
    finally:
        ranks.close_runtime(runtime)
    if args.audit and args.strict and (result['audit'].flipped or result['independent'].failed):
        sys.exit(utils.EXIT_AUDIT_FAILED)
    return result


def run_convergence_audit(model, loader, args, runtime, logger, stats):
    """``audit.convergence_audit`` of the certificates the evaluation reported (``stats``) at
    ``--epsilon``, printed; returns its report."""
    if runtime.distributed:
        raise utils.UsageError('--audit runs in one process (drop torchrun)')
    report = audit.convergence_audit(model, loader, args, runtime, args.epsilon, stats)
    for line in report.lines():
        logger.info(line)
    return report


def run_independent_audit(model, loader, args, logger, stats):
    """``audit.independent_audit`` of the reported certificates (``stats``) at ``--epsilon`` (PGD
    with ``--niter`` steps and ``--restarts`` starts, seeded by ``--seed``), printed; returns its report."""
    report = audit.independent_audit(model, loader, args.epsilon, stats, steps=args.niter, restarts=args.restarts,
                                     seed=args.seed)
    for line in report.lines():
        logger.info(line)
    return report


def output_prefix(saved_model):
    """Where this model's CSVs go: ``--saved_model`` without ``_best.pth`` (or ``.pth``)."""
    for suffix in ('_best.pth', '.pth'):
        if saved_model.endswith(suffix):
            return saved_model[:-len(suffix)]
    return saved_model


def run_radius(model, loader, args, runtime, logger, starts=None):
    """Certified radius of every test example (``radius.dataset_radii``) with the test-time settings;
    writes the CSV and prints certified accuracy at the paper's radii. Returns the summary."""
    if runtime.distributed:
        raise utils.UsageError('--radius runs in one process (drop torchrun)')
    eps_max = args.radius_max if args.radius_max is not None else 3 * args.epsilon
    thresholds = data_load.dataset(args.data).paper_radii
    rows, summary = radius.dataset_radii(
        model, loader, device=runtime.device, eps_max=eps_max, eval_eps=args.epsilon, anchors=thresholds,
        tol=args.radius_tol, settings=evaluation.bound_settings(args, training=False), progress=runtime.is_main,
        store=starts)
    path = output_prefix(args.saved_model) + '_radius.csv'
    radius.write_radius_csv(path, rows)
    accuracy = radius.certified_accuracy_at([row['radius'] for row in rows], thresholds,
                                            [bool(row['correct']) for row in rows])
    logger.info(f"certified radius of {summary['examples']} examples (eps <= {eps_max:g}, tolerance "
                f"{summary['tol']:g}, {summary['steps']} bisection steps) -> {path}; "
                f"{summary['non_monotone']} not monotone, {summary['capped']} certified up to the maximum")
    if summary.get('failure_prob') is not None:
        logger.info(f"each radius fails with probability at most {summary['failure_prob']:g} (at most "
                    f"{summary['calls']} certifications per example, {summary['failure_prob'] / summary['calls']:.3g} "
                    'each)')
    logger.info('certified accuracy at ' + ', '.join(f'{t:.4f}: {a:.4f}' for t, a in accuracy.items()))
    return {**summary, 'accuracy': accuracy, 'path': path}


def run_empirical_lip(model, loader, args, runtime, logger):
    """Mean empirical local Lipschitzness over the test set, both directions; writes the CSV."""
    eps = args.lip_eps if args.lip_eps is not None else data_load.dataset(args.data).lip_eps
    norm = norms.order(args.lip_norm)
    result = empirical.dataset_lipschitzness(model, loader, eps, norm=norm, device=runtime.device,
                                             certified=evaluation.bound_settings(args, training=False),
                                             seed=args.seed, progress=runtime.is_main)
    path = output_prefix(args.saved_model) + '_lipschitz.csv'
    empirical.write_lipschitzness_csv(path, result)
    logger.info(f"empirical local Lipschitzness (L-inf box {eps:g}, norm {args.lip_norm}) over "
                f"{result['examples']} examples: maximisation {result['lip_max']:.4f}, as published (descent) "
                f"{result['lip_as_published']:.4f}; certified ratio bound mean "
                f"{float(result['per_example_certified'].mean()):.4f} -> {path}")
    return {'lip_max': result['lip_max'], 'lip_as_published': result['lip_as_published'], 'path': path}


if __name__ == '__main__':
    main()
