"""compare.py: both families in one table on the same real test digits and L2 eps."""
import csv

import pytest
import torch

import checkpoints
import compare
import utils
from lolip.archs import build_model
from helpers import MNIST_MINI, needs_mnist


@pytest.fixture
def saved_models(tmp_path):
    """A Local-Lip relux checkpoint (trainer's format) and a lolip CNN001 one (lolip's format),
    both untrained: the table's plumbing and its invariants are what is checked."""
    torch.manual_seed(0)
    relux = utils.select_model('mnist', 'relux')
    checkpoints.atomic_save({'state_dict': relux.state_dict(), 'err': 1.0, 'epoch': 0},
                        str(tmp_path / 'relux_best.pth'))
    cnn = build_model('CNN001', 10, 1)
    checkpoints.atomic_save({'state_dict': cnn.state_dict(), 'model': 'ce-tor-CNN001',
                         'dataset': 'mnist', 'epoch': 0}, str(tmp_path / 'cnn.pth'))
    return tmp_path


@needs_mnist
def test_one_table_for_both_families(saved_models, one_thread, capsys):
    out = saved_models / 'table'
    rows = compare.main(['--data', 'mnist', '--data_dir', str(MNIST_MINI), '--eps', '1.58',
                         '--limit_test', '20', '--pgd_steps', '10', '--sniter', '30',
                         '--opt_iter', '30', '--device', 'cpu', '--out', str(out),
                         '--locallip', f'relux:{saved_models / "relux_best.pth"}',
                         '--lolip', str(saved_models / 'cnn.pth')])
    certified, empirical_row = rows
    assert certified['family'].startswith('Local-Lip') and empirical_row['family'].startswith('lolip')
    assert empirical_row['certified_acc'] == 0 and 'no certificate' in empirical_row['note']
    assert empirical_row['local_bound'] is None and empirical_row['ratio_bound'] is None
    for row in rows:
        assert row['certified_acc'] <= row['pgd_acc'] <= 1 and row['pgd_acc'] <= row['clean_acc'] + 0.2
        assert 0 < row['lip_as_published'] <= row['lip_max']
    # soundness across the two pieces: the certified bound on the ratio is above the search's value
    assert certified['ratio_bound'] >= certified['lip_max']
    assert certified['local_bound'] > 0
    text = (saved_models / 'table.md').read_text()
    assert 'first 20 test images, L2 eps 1.58' in text and text.count('\n| ') == 3
    with open(saved_models / 'table.csv') as handle:
        assert [r['family'] for r in csv.DictReader(handle)] == [r['family'] for r in rows]
    assert 'written:' in capsys.readouterr().out


def test_wrong_dataset_checkpoint_is_one_line(saved_models, tmp_path):
    with pytest.raises(compare.CompareError, match="'mnist' checkpoint, not 'cifar10'"):
        compare.load_lolip(str(saved_models / 'cnn.pth'), 'cifar10', 'cpu')
    with pytest.raises(compare.CompareError, match='NAME:PATH'):
        compare.load_locallip(str(saved_models / 'relux_best.pth'), 'mnist', 'cpu')


def test_no_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        compare.main(['--data', 'mnist', '--eps', '1'])
    assert stop.value.code == 2 and '--locallip' in capsys.readouterr().err
