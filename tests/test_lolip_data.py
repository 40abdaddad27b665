"""lolip data: SVHN and Restricted ImageNet builders (data_load.py), the Restricted ImageNet
preparation script on a fake ImageNet folder, and the third example of docs/method_lolip.md run on it."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data_load
from lolip import data
from lolip import main as lolip_main
from lolip import prepare_restricted_imagenet as prepare

ROOT = Path(__file__).resolve().parents[1]
# WNID positions with one image each: both ends of every range and the classes just outside
POSITIONS = [29, 30, 32, 33, 37, 38, 79, 80, 100, 117, 118, 121, 150, 151, 268, 280, 281, 285,
             299, 300, 319, 364, 365, 382, 388, 389, 397, 398, 999]


def fake_imagenet(root, images_per_class=1):
    """1000 WNID folders in train/ and val/ (sorted order = standard index); images only at
    POSITIONS, each a random 80x100 RGB JPEG-free PNG."""
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for index in range(prepare.IMAGENET_CLASSES):
            folder = root / split / f'n{index:08d}'
            folder.mkdir(parents=True)
            if index in POSITIONS:
                for k in range(images_per_class):
                    pixels = rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f'{split}_{index}_{k}.png')
    return root


def expected_counts():
    return {name: sum(first <= p <= last for p in POSITIONS)
            for name, (first, last) in prepare.SUPER_CLASSES.items()}


def test_super_classes_are_the_203_standard_classes():
    sizes = [last - first + 1 for first, last in prepare.SUPER_CLASSES.values()]
    assert sum(sizes) == 203
    wnids = [f'n{i:08d}' for i in range(1000)]
    ranges = prepare.wnid_ranges(wnids)
    assert ranges['dog'][0] == 'n00000151' and ranges['dog'][-1] == 'n00000268'
    assert ranges['frog'] == ['n00000030', 'n00000031', 'n00000032']


def test_prepare_links_the_ranges_inclusively_and_the_loader_reads_them(tmp_path):
    imagenet = fake_imagenet(tmp_path / 'imagenet')
    counts = prepare.prepare(imagenet, tmp_path / 'data')
    assert counts['train'] == counts['val'] == expected_counts()
    assert prepare.prepare(imagenet, tmp_path / 'data') == counts  # safe to run twice
    train, val = data_load.restricted_imagenet_datasets(tmp_path / 'data')
    assert train.classes == ['bird', 'cat', 'crab', 'dog', 'fish', 'frog', 'insect', 'primate',
                             'turtle']
    x, label = val[0]
    assert x.shape == (3, 64, 64) and 0 <= x.min() and x.max() <= 1 and label == 0
    assert len(train) == sum(expected_counts().values())
    report_view = data.load('resImgnet112v3', tmp_path / 'data').train_eval  # centre crop
    assert torch.equal(report_view[0][0], report_view[0][0])


def test_prepare_errors_are_one_line(tmp_path):
    missing = subprocess.run([sys.executable, '-m', 'lolip.prepare_restricted_imagenet', '--imagenet',
                              str(tmp_path / 'nowhere'), '--data_dir', str(tmp_path)],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f'error: ImageNet folder {tmp_path / "nowhere"} not found']
    (tmp_path / 'partial' / 'train' / 'n01440764').mkdir(parents=True)
    (tmp_path / 'partial' / 'val').mkdir()
    with pytest.raises(prepare.PreparationError, match='1 class folders, expected 1000'):
        prepare.prepare(tmp_path / 'partial', tmp_path)


def test_restricted_imagenet_missing_names_the_script(tmp_path):
    with pytest.raises(data_load.DataNotFoundError, match='lolip.prepare_restricted_imagenet'):
        data_load.restricted_imagenet_datasets(tmp_path)


def test_svhn_missing_is_a_data_not_found_error(tmp_path):
    with pytest.raises(data_load.DataNotFoundError, match='SVHN not found'):
        data_load.svhn_datasets(tmp_path, download=False)


def test_svhn_reads_torchvision_files(tmp_path, monkeypatch):
    """Fake .mat files in SVHN's layout (32x32x3xN uint8, labels 1..10 with 10 meaning digit 0);
    only the md5 check is bypassed."""
    scipy_io = pytest.importorskip('scipy.io')
    rng = np.random.default_rng(0)
    for split, count in (('train', 6), ('test', 4)):
        scipy_io.savemat(tmp_path / f'{split}_32x32.mat',
                         {'X': rng.integers(0, 256, (32, 32, 3, count), dtype=np.uint8),
                          'y': np.arange(1, count + 1).reshape(-1, 1) % 10 + 1})
    monkeypatch.setattr(data_load.datasets.SVHN, '_check_integrity', lambda self: True)
    train, test = data.load('svhn', tmp_path, limit_train=5).train, data.load('svhn', tmp_path).test
    assert len(train) == 5 and len(test) == 4
    x, label = train[0]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1 and label == 2


@pytest.mark.slow
def test_example_3_runs_on_a_fake_imagenet(tmp_path, one_thread, capsys):
    """The third example of docs/method_lolip.md as written (AT, ResNet50, Adam batch 128) plus --data_dir and one
    short epoch, on the fake ImageNet after the preparation script: it trains, attacks, measures
    and writes its JSON. (The images are noise: only the plumbing is checked here.)"""
    prepare.prepare(fake_imagenet(tmp_path / 'imagenet'), tmp_path / 'data')
    argv = ('--experiment restrictedImgnet --no-hooks --norm inf --eps 0.005 --dataset '
            'resImgnet112v3 --model advce-tor-ResNet50-adambs128 --attack pgd --random_seed 0').split()
    result = lolip_main.main(argv + ['--data_dir', str(tmp_path / 'data'), '--out_dir',
                                     str(tmp_path / 'runs'), '--epochs', '1', '--limit_train', '4',
                                     '--limit_test', '2', '--device', 'cpu'])
    assert 'adversarial accuracy' in capsys.readouterr().out
    path = tmp_path / 'runs' / 'restrictedImgnet' / 'resImgnet112v3-inf-0.005-advce-tor-ResNet50-adambs128-pgd-0.json'
    stored = json.loads(path.read_text())
    assert stored['recipe']['optimizer'] == 'adam' and stored['recipe']['batch_size'] == 128
    assert stored['train_examples'] == 4 and stored['test_examples'] == 2
    assert stored['adv_test_acc'] == result['adv_test_acc']
    assert stored['test_lip_as_published'] <= stored['test_lip_max']
