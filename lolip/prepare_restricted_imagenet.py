"""Build Restricted ImageNet from an ImageNet folder (docs/method_lolip.md §5).

    python -m lolip.prepare_restricted_imagenet --imagenet /path/to/imagenet --data_dir data/

``--imagenet`` holds ``train/`` and ``val/``, each with the 1000 WNID class folders (val/ regrouped
into class folders). The 9 super-classes take the WNIDs at these positions of the sorted list
(inclusive ranges, 203 classes); every image gets a symbolic link in
``<data_dir>/restricted_imagenet/{train,val}/<super-class>/``, so the super-class folders sort
alphabetically into the labels bird, cat, crab, dog, fish, frog, insect, primate, turtle.
"""
import os
import sys
from pathlib import Path

import data_load
import utils

SUPER_CLASSES = {
    'dog': (151, 268), 'cat': (281, 285), 'frog': (30, 32), 'turtle': (33, 37),
    'bird': (80, 100), 'primate': (365, 382), 'fish': (389, 397), 'crab': (118, 121),
    'insect': (300, 319),
}
IMAGENET_CLASSES = 1000


class PreparationError(RuntimeError):
    """The ImageNet folder is missing or not laid out as expected (one-line message)."""


def wnid_ranges(wnids):
    """{super-class: [WNIDs]} from the sorted list of the 1000 ImageNet WNIDs."""
    return {name: wnids[first:last + 1] for name, (first, last) in SUPER_CLASSES.items()}


def class_folders(split_dir):
    """The sorted class folder names of ``split_dir``; PreparationError unless there are 1000."""
    if not split_dir.is_dir():
        raise PreparationError(f'ImageNet folder {split_dir} not found (needs train/ and val/ '
                               f'with the {IMAGENET_CLASSES} WNID class folders)')
    wnids = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir())
    if len(wnids) != IMAGENET_CLASSES:
        raise PreparationError(f'{split_dir} has {len(wnids)} class folders, expected '
                               f'{IMAGENET_CLASSES} WNID folders (val/ must be regrouped by class)')
    return wnids


def link_split(source, target):
    """Links every image of the selected WNIDs of ``source`` into ``target``/<super-class>/."""
    counts = {}
    for name, wnids in wnid_ranges(class_folders(source)).items():
        folder = target / name
        folder.mkdir(parents=True, exist_ok=True)
        counts[name] = 0
        for wnid in wnids:
            for image in sorted((source / wnid).iterdir()):
                link = folder / f'{wnid}_{image.name}'
                if not link.exists():
                    os.symlink(image.resolve(), link)
                counts[name] += 1
    return counts


def prepare(imagenet, data_dir):
    """Builds both splits; returns {split: {super-class: image count}}."""
    imagenet, out = Path(imagenet), Path(data_dir) / data_load.RESTRICTED_IMAGENET_FOLDER
    if not imagenet.is_dir():
        raise PreparationError(f'ImageNet folder {imagenet} not found')
    return {split: link_split(imagenet / split, out / split) for split in ('train', 'val')}


def main(argv=None):
    parser = utils.OneLineParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--imagenet', required=True, help='folder with ImageNet train/ and val/')
    parser.add_argument('--data_dir', default='data/', help='where restricted_imagenet/ goes')
    args = parser.parse_args(argv)
    try:
        counts = prepare(args.imagenet, args.data_dir)
    except (PreparationError, OSError) as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)
    for split, per_class in counts.items():
        print(f'{split}: ' + ', '.join(f'{name} {count}' for name, count in sorted(per_class.items())))


if __name__ == '__main__':
    main()
