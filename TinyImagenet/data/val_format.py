"""Regroup TinyImageNet's validation images into one folder per class.

The archive ships ``val/images/*.JPEG`` plus ``val/val_annotations.txt`` (tab separated:
file name, wnid, bounding box). ImageFolder needs ``val/<wnid>/<file>`` instead.

    python TinyImagenet/data/val_format.py [--root data/tiny-imagenet-200]
"""

import argparse
import sys
from pathlib import Path

ANNOTATIONS = 'val_annotations.txt'


class ValFormatError(Exception):
    """The folder is not a TinyImageNet root that can be regrouped."""


def read_annotations(path):
    """{file name: wnid} from a val_annotations.txt file."""
    wnid_of = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split('\t')
        if len(fields) < 2:
            raise ValFormatError(f'{path}:{number}: expected "file<TAB>wnid...", got {line!r}')
        wnid_of[fields[0]] = fields[1]
    return wnid_of


def _move_image(images_dir, val_dir, name, wnid):
    """Moves one image into its class folder; an image already there is left alone."""
    target = val_dir / wnid / name
    if target.exists():
        return False
    source = images_dir / name
    if not source.exists():
        raise ValFormatError(f'{source} is listed in {ANNOTATIONS} but missing')
    target.parent.mkdir(exist_ok=True)
    source.rename(target)
    return True


def regroup_val(root):
    """Moves ``root/val/images/*`` into ``root/val/<wnid>/``; returns how many images moved.

    Returns 0 when val/ is already regrouped. Raises ValFormatError on a wrong layout.
    """
    val_dir = Path(root) / 'val'
    if not val_dir.is_dir():
        raise ValFormatError(f'{val_dir} does not exist; pass --root <path to tiny-imagenet-200>')
    images_dir = val_dir / 'images'
    if not images_dir.is_dir():
        if any(path.is_dir() for path in val_dir.iterdir()):
            return 0
        raise ValFormatError(f'{val_dir} has neither images/ nor class folders')
    annotations = val_dir / ANNOTATIONS
    if not annotations.is_file():
        raise ValFormatError(f'{annotations} is missing; unpack tiny-imagenet-200.zip again')
    moved = sum(_move_image(images_dir, val_dir, name, wnid)
                for name, wnid in read_annotations(annotations).items())
    leftovers = list(images_dir.iterdir())
    if leftovers:
        raise ValFormatError(f'{len(leftovers)} files in {images_dir} are not in {ANNOTATIONS}')
    images_dir.rmdir()
    return moved


def main(argv=None):
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--root', default='data/tiny-imagenet-200',
                        help='the unpacked tiny-imagenet-200 folder (default: %(default)s)')
    args = parser.parse_args(argv)
    try:
        moved = regroup_val(args.root)
    except (ValFormatError, OSError) as error:
        print(f'val_format.py: error: {error}', file=sys.stderr)
        return 2
    if moved:
        print(f'regrouped {moved} validation images into class folders under {args.root}/val')
    else:
        print(f'{args.root}/val is already regrouped into class folders; nothing to do')
    return 0


if __name__ == '__main__':
    sys.exit(main())
