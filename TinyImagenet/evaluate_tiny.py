"""Clean, PGD and certified error of a saved TinyImageNet model, one process or many with torchrun.

    torchrun --nproc_per_node=4 TinyImagenet/evaluate_tiny.py --model tinyimagenet_relux \
        --saved_model pretrained/tiny_relux_tinyimagenet_relux --test_sniter 2000 --data_dir data/

``evaluate.py`` with TinyImageNet's defaults and flags (``--indices`` as in training).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluate  # noqa: E402  (the shared modules live one folder up)
import train_tiny_multi  # noqa: E402


def parse(argv=None):
    args = evaluate.parse_args(argv, extra=train_tiny_multi.tiny_flags, **train_tiny_multi.DEFAULTS)
    return train_tiny_multi.check_indices(args)


if __name__ == '__main__':
    evaluate.main(parse=parse)
