"""lolip command line: the --model grammar, recipes, models, one-line errors, the first example of
docs/method_lolip.md on real MNIST digits (JSON + table), checkpoints and --resume."""
import json
import math
import subprocess
import sys

import pytest
import torch

import checkpoints
from lolip import main as lolip_main
from lolip.archs import build_model
from lolip.grammar import GrammarError, parse_model
from lolip.recipe import recipe_for
from helpers import MNIST_MINI, ROOT, needs_mnist

EXAMPLE_1 = ('--experiment experiment01 --no-hooks --norm inf --eps 0.1 --dataset mnist '
             '--model ce-tor-CNN001 --attack pgd --random_seed 0').split()


@pytest.mark.parametrize('name, objective, params', [
    ('ce-tor-CNN001', 'natural', {}),
    ('advce-tor-ResNet50-adambs128', 'adv', {}),
    ('advbetace-tor-WRN_40_10', 'advbeta', {'beta': 1.0}),
    ('advbeta.5ce-tor-WRN_40_10', 'advbeta', {'beta': 0.5}),
    ('advbeta8ce-tor-WRN_40_10', 'advbeta', {'beta': 8.0}),
    ('stradesce-tor-WRN_40_10', 'trades', {'beta': 1.0, 'steps': 10, 'summed': True}),
    ('strades6ce-tor-WRN_40_10', 'trades', {'beta': 6.0, 'steps': 10, 'summed': True}),
    ('trades10K20ce-tor-CNN002', 'trades', {'beta': 10.0, 'steps': 20, 'summed': False}),
    ('tulipce-tor-WRN_40_10_drop20', 'tulip', {'lam': 1.0, 'step': 1.0}),
    ('tulipem2ssem3ce-tor-CNN001', 'tulip', {'lam': 0.01, 'step': 0.001}),
    ('sllr36ce-tor-WRN_40_10', 'llr', {'lam': 3.0, 'mu': 6.0, 'summed': True}),
    ('llr65ce-tor-CNN001', 'llr', {'lam': 6.0, 'mu': 5.0, 'summed': False}),
])
def test_grammar_picks_the_objective_by_first_matching_substring(name, objective, params):
    spec = parse_model(name)
    assert (spec.objective, spec.params) == (objective, params)


def test_grammar_reads_aug_arch_and_hyper_tokens():
    spec = parse_model('aug01-strades6ce-tor-ResNet50_drop50-nadamlrem3bs16ep2mo.9')
    assert (spec.aug, spec.arch) == ('aug01', 'ResNet50_drop50')
    assert spec.hyper == {'optimizer': 'nadam', 'lr': 1e-3, 'batch_size': 16, 'epochs': 2,
                          'momentum': 0.9}


@pytest.mark.parametrize('name', ['tor-CNN001', 'adv-tor-CNN001', 'ce-tor-VGG16', 'ce-CNN001',
                                  'ce-tor-CNN001-fast', 'aug02-ce-tor-CNN001', 'ce-tor-CNN001-x-y'])
def test_grammar_rejects_strings_outside_it_and_names_it(name):
    with pytest.raises(GrammarError, match=r'\[AUG-\]LOSS-tor-ARCH\[-HYPER\]'):
        parse_model(name)


def test_recipes_follow_the_table():
    mnist = recipe_for('mnist', parse_model('ce-tor-CNN001'))
    assert (mnist.optimizer, mnist.lr, mnist.momentum, mnist.batch_size, mnist.epochs,
            mnist.milestones) == ('sgd', 1e-4, 0.9, 64, 160, (40, 80, 120, 140))
    assert recipe_for('cifar10', parse_model('strades6ce-tor-WRN_40_10')).lr == 1e-2
    assert recipe_for('cifar10', parse_model('advce-tor-WRN_40_10')).lr == 1e-3
    assert recipe_for('cifar10', parse_model('advce-tor-WRN_40_10-lrem2')).lr == 1e-2
    assert recipe_for('svhn', parse_model('sllrce-tor-WRN_40_10')).milestones == (30, 50)
    imagenet = recipe_for('resImgnet112v3', parse_model('advce-tor-ResNet50-adambs128'))
    assert (imagenet.optimizer, imagenet.batch_size, imagenet.epochs) == ('adam', 128, 70)


@pytest.mark.parametrize('arch, shape, classes', [
    ('CNN001', (1, 28, 28), 10), ('CNN002', (1, 28, 28), 10), ('WRN_40_10_drop50', (3, 32, 32), 10),
    ('ResNet50', (3, 64, 64), 9), ('ResNet50_drop20', (1, 28, 28), 10)])
def test_models_take_their_inputs(arch, shape, classes):
    torch.manual_seed(0)
    model = build_model(arch, classes, shape[0]).eval()
    with torch.no_grad():
        assert model(torch.rand(2, *shape)).shape == (2, classes)


def test_architecture_details():
    assert sum(p.numel() for p in build_model('CNN001', 10, 1).parameters()) == 1_199_882
    wrn = build_model('WRN_40_10', 10, 3)
    assert sum(p.numel() for p in wrn.parameters()) == pytest.approx(55.8e6, rel=0.01)
    assert len(wrn.blocks) == 18 and wrn.fc.in_features == 640
    cnn2 = build_model('CNN002', 10, 1)
    assert cnn2[-1].weight.abs().sum() == 0 and cnn2[-1].bias.abs().sum() == 0
    dropped = build_model('ResNet50_drop20', 9, 3)
    assert sum(isinstance(m, torch.nn.Dropout) for m in dropped.modules()) == 16 - 4


def run_script(*argv):
    return subprocess.run([sys.executable, str(ROOT / 'lolip' / 'main.py'), *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def with_flags(**flags):
    """EXAMPLE_1 with some flags replaced (``eps='0'`` sets --eps 0)."""
    argv = list(EXAMPLE_1)
    for flag, value in flags.items():
        argv[argv.index(f'--{flag}') + 1] = value
    return argv


def test_unknown_model_names_the_grammar_in_one_line():
    result = run_script(*with_flags(model='ce-tor-VGG16'))
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert 'LOSS-tor-ARCH' in result.stderr and 'ResNet50' in result.stderr


@pytest.mark.parametrize('flags, message', [
    (dict(norm='1'), "invalid choice: '1'"), (dict(eps='0'), '--eps must be positive'),
    (dict(dataset='imagenet'), "invalid choice: 'imagenet'"),
    (dict(model='trades-tor-CNN001'), 'LOSS contains ce'),
    (dict(dataset='cifar10'), 'CNN001 takes 28x28 MNIST digits')])
def test_bad_flags_end_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        lolip_main.main(with_flags(**flags))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_missing_data_is_one_line(tmp_path):
    result = run_script('--experiment', 'restrictedImgnet', '--norm', 'inf', '--eps', '0.005',
                        '--dataset', 'resImgnet112v3', '--model', 'advce-tor-ResNet50-adambs128',
                        '--attack', 'pgd', '--data_dir', str(tmp_path), '--out_dir', str(tmp_path))
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert 'lolip.prepare_restricted_imagenet' in result.stderr.strip().splitlines()[-1]


@needs_mnist
@pytest.mark.slow
def test_example_1_on_real_digits_then_resume(tmp_path, one_thread, capsys):
    """The first example of docs/method_lolip.md as written plus --data_dir and small limits: one JSON, one table;
    a second call with --resume --epochs 2 continues and ends where an uninterrupted 2-epoch run
    ends (same RNG state restored, so the same weights)."""
    ours = ['--data_dir', str(MNIST_MINI), '--out_dir', str(tmp_path / 'a'), '--limit_train', '128',
            '--limit_test', '32', '--device', 'cpu']
    result = lolip_main.main(EXAMPLE_1 + ours + ['--epochs', '1'])
    out = capsys.readouterr().out
    assert 'local Lipschitzness (max, the definition)' in out and 'results:' in out
    stored = json.loads((tmp_path / 'a' / 'experiment01' /
                         'mnist-inf-0.1-ce-tor-CNN001-pgd-0.json').read_text())
    for key in ('train_acc', 'test_acc', 'adv_train_acc', 'adv_test_acc', 'train_lip_max',
                'test_lip_max', 'train_lip_as_published', 'test_lip_as_published', 'gap_acc',
                'gap_adv_acc'):
        assert math.isfinite(stored[key]) and stored[key] == result[key]
    assert stored['train_examples'] == 128 and stored['test_examples'] == 32
    assert stored['train_lip_as_published'] < stored['train_lip_max']

    resumed = lolip_main.main(EXAMPLE_1 + ours + ['--epochs', '2', '--resume'])
    assert 'resumed from' in capsys.readouterr().out
    assert [h['epoch'] for h in resumed['history']] == [1, 2]
    straight = ours[:3] + [str(tmp_path / 'b')] + ours[4:]
    lolip_main.main(EXAMPLE_1 + straight + ['--epochs', '2'])
    one = checkpoints.load_state(tmp_path / 'a' / 'experiment01' / 'mnist-inf-0.1-ce-tor-CNN001-pgd-0.pth')
    two = checkpoints.load_state(tmp_path / 'b' / 'experiment01' / 'mnist-inf-0.1-ce-tor-CNN001-pgd-0.pth')
    assert one['epoch'] == two['epoch'] == 2
    for key, value in one['state_dict'].items():
        assert torch.allclose(value, two['state_dict'][key]), key
