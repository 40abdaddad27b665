"""Certified training on TinyImageNet (docs/method.md §4-5), one process or many with torchrun.

    torchrun --nproc_per_node=4 TinyImagenet/train_tiny_multi.py --model tinyimagenet_relux \
        --batch_size 32 --sparse 0.01 --indices 0,6,12,14,17 --lr 2.5e-4 --data_dir data/

(``run_job.sh`` has the authors' recipes.) The shared training loop of ``trainer.py`` does the
work; TinyImageNet adds the sparsity loss (``--sparse``, ``--sp_thres``), per-example stores for
the ``--indices`` layers only (the others use their global norm) and fp16 stores.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import local_bound  # noqa: E402  (the shared modules live one folder up)
import trainer  # noqa: E402
import utils  # noqa: E402

DEFAULTS = dict(data='tinyimagenet', model='tinyimagenet_relux', batch_size=32, epochs=250, warmup=0,
                rampup=125, epsilon=36 / 255, epsilon_train=0.16, lr=1e-3, end_lr=5e-7)


def layer_indices(text):
    """``'0,6,12'`` -> ``[0, 6, 12]`` (argparse type of ``--indices``)."""
    try:
        return sorted({int(part) for part in text.split(',') if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected layer indices like 0,6,12,14,17, got {text!r}') from None


def tiny_flags(parser):
    """TinyImageNet's flags; per-example stores default to fp16 here."""
    g = parser.add_argument_group('TinyImageNet')
    g.add_argument('--sparse', type=float, default=0.1, help='weight of the sparsity loss (0: off)')
    g.add_argument('--sp_thres', type=float, default=0.1,
                   help='weight of the ReLU_x saturation part of the sparsity loss')
    g.add_argument('--indices', type=layer_indices, default=None,
                   help='conv/linear layers with per-example singular vectors, e.g. 0,6,12,14,17; the '
                        'others contribute their global norm (default: every one but the last)')
    parser.set_defaults(store_dtype='float16')


def check_indices(args):
    """``args``, after a one-line exit when ``--indices`` names no conv/linear layer before the last."""
    model = utils.select_model(args.data, args.model, args.init)
    allowed = [i for i, layer in enumerate(model) if local_bound.is_affine(layer)][:-1]
    wrong = sorted(set(args.indices or ()) - set(allowed))
    if wrong:
        utils.exit_user_error(f'--indices {wrong} are not conv/linear layers before the last of {args.model}; '
                              f'choose from {",".join(map(str, allowed))}')
    return args


def parse(argv=None):
    return check_indices(utils.argparser(argv=argv, extra=tiny_flags, **DEFAULTS))


if __name__ == '__main__':
    trainer.main(parse)
