"""Clean, PGD and certified error of a saved model (ours or the authors' checkpoints).

    python evaluate.py --data cifar10 --model c6f2_relux --epsilon 0.141 --test_sniter 2000 \
        --saved_model pretrained/relu/cifar_6C2F
"""
import sys

import torch

import data_load
import trainer
import utils


def extra_flags(parser):
    parser.add_argument('--no_pgd', action='store_true', help='skip the PGD attack')


def checkpoint_path(saved_model):
    """``<saved_model>_best.pth``, or the path itself when it already names a .pth file."""
    return saved_model if saved_model.endswith('.pth') else saved_model + '_best.pth'


def parse_args(argv=None, extra=None, **defaults):
    """The flags of utils.argparser plus this script's; ``extra``/``defaults`` as there."""
    def flags(parser):
        extra_flags(parser)
        if extra is not None:
            extra(parser)
    return utils.argparser(argv=argv, extra=flags, **{'data': 'cifar10', 'model': 'c6f2_relux', **defaults})


def load_for_evaluation(args, runtime, logger):
    """(model, this rank's test loader, seeded start vectors) for ``--saved_model`` and the flags."""
    if args.saved_model is None:
        raise trainer.CheckpointError('--saved_model is required (the prefix of <prefix>_best.pth)')
    path = checkpoint_path(args.saved_model)
    model, state = trainer.load_model(path, args.data, args.model, args.init, runtime.device)
    model.eval()
    logger.info(f'{path}: {args.model} on {args.data}'
                + (f", saved at epoch {state['epoch']}" if 'epoch' in state else ''))
    _, test_set = data_load.build_datasets(args.data, args.data_dir, augmentation=False,
                                           normalization=args.normalization)
    loader = trainer.test_loader_for(trainer.limited(test_set, args.limit_test), args, runtime)
    torch.manual_seed(args.seed)
    return model, loader, trainer.evaluation_starts(model, args)


def main(argv=None, parse=parse_args):
    """Evaluate ``--saved_model`` with the flags ``parse(argv)`` returns (one process or torchrun)."""
    args = parse(argv)
    runtime = trainer.init_runtime(args.device)
    logger = utils.get_logger(quiet=not runtime.is_main)
    try:
        model, loader, starts = load_for_evaluation(args, runtime, logger)
        if args.no_pgd:
            stats = trainer.evaluate_certified(model, loader, args, runtime, args.epsilon, starts)
            logger.info(f'{stats.examples} test examples at eps {args.epsilon:.4f}: clean error '
                        f'{stats.clean_err:.4f} | certified error {stats.certified_err:.4f} '
                        f'(acc {1 - stats.certified_err:.4f})')
            return {'clean_err': stats.clean_err, 'certified_err': stats.certified_err,
                    'examples': stats.examples}
        return trainer.evaluate_all(model, loader, args, runtime, logger, store=starts)
    except trainer.USER_ERRORS as error:
        sys.exit(f'error: {error}')
    finally:
        trainer.close_runtime(runtime)


if __name__ == '__main__':
    main()
