"""The README as a newcomer meets it: its Python block runs as printed, and every command of its
bash blocks is accepted as written (the script exists, starts, and its parser takes every flag);
the cheap ones are run in full here or by the test named next to them."""
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
import train_cifar10
import train_mnist

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ''}


def blocks(language):
    return re.findall(rf'^```{language}\n(.*?)^```', README, re.M | re.S)


def commands():
    """Every command of the bash blocks: one per line, chains split at &&, comments dropped."""
    found = []
    for block in blocks('bash'):
        for line in block.splitlines():
            line = line.split('  #')[0].strip()
            found += [part.strip() for part in line.split(' && ') if part.strip()]
    return found


def load_bounds():
    spec = importlib.util.spec_from_file_location('bounds_script', ROOT / 'experiments' / 'bounds.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_python_block_runs_as_printed():
    code, = blocks('python')
    done = subprocess.run([sys.executable, '-'], input=code, cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.fullmatch(r'\d of 8 certified; median local bound [\d.]+, global [\d.]+\n', done.stdout), done.stdout


def test_the_commands_are_the_ones_checked_here():
    assert commands() == [
        'python3 -m pip install -r requirements.txt',
        'python3 -m pip install -r requirements.txt', QUICK_TRAIN, QUICK_EVALUATE,
        'bash run_job.sh mnist', 'bash run_job.sh cifar_6c2f', 'python3 train_cifar10.py --help',
        'bash TinyImagenet/data/tinyimagenet.sh data/', 'bash TinyImagenet/run_job.sh relux',
        SHIPPED_EVALUATE, BOUNDS_MNIST, 'python3 -m pytest -q']


QUICK_TRAIN = ('python3 train_mnist.py --data_dir samples/mnist --prefix quick --epochs 5 --rampup 3 --gloro --sniter 2 '
               '--opt_iter 2 --epsilon_train 1.75 --batch_size 64 --test_sniter 20 --test_opt_iter 20 --niter 10 '
               '--workers 0')
QUICK_EVALUATE = ('python3 evaluate.py --data mnist --model relux --saved_model pretrained/quick_relux --data_dir '
                  'samples/mnist --epsilon 1.58 --niter 10 --workers 0')
SHIPPED_EVALUATE = ('python3 evaluate.py --data mnist --model relux --saved_model pretrained/mnist_relux_sample '
                    '--data_dir samples/mnist --epsilon 1.58 --niter 10 --workers 0')
BOUNDS_MNIST = 'python3 experiments/bounds.py --data mnist --out runs/bounds_mnist --threads 1'


def test_install_lines_name_files_that_exist_and_the_test_line_is_ci():
    requirements = (ROOT / 'requirements.txt').read_text().splitlines()
    for line in requirements:                           # what pip installs here is importable
        name = re.split(r'[<>=\s]', line.strip())[0]
        if name and not name.startswith('#'):
            assert importlib.util.find_spec(name) is not None, name
    assert 'python3 -m pip install -e .' in README and (ROOT / 'pyproject.toml').is_file()
    assert 'python3 -m pytest -q\n' in (ROOT / '.ci' / 'run').read_text()


def test_pip_install_e_installs_every_top_level_module():
    """``pip install -e .`` installs the modules pyproject.toml lists: every top-level one."""
    listed = set(re.findall(r'"(\w+)"', re.search(r'py-modules = \[(.*?)\]', (ROOT / 'pyproject.toml').read_text(),
                                                   re.S).group(1)))
    assert listed == {path.stem for path in ROOT.glob('*.py')}


def test_quick_start_flags_parse_and_its_two_commands_fit_together():
    train_argv = shlex.split(QUICK_TRAIN)[2:]
    args = train_mnist.parse(argv=train_argv)
    assert (args.data, args.model, args.epochs) == ('mnist', 'relux', 5)
    evaluated = evaluate.parse_args(shlex.split(QUICK_EVALUATE)[2:])
    assert evaluated.saved_model == args.prefix         # pretrained/quick_relux: what training writes
    assert (ROOT / args.data_dir / 'MNIST' / 'raw').is_dir()


def test_the_shipped_evaluation_is_the_one_test_shipped_runs():
    # tests/test_shipped.py runs pretrained/README.md's line in full and checks the quoted output
    shipped = (ROOT / 'pretrained' / 'README.md').read_text()
    assert SHIPPED_EVALUATE.replace('python3 ', 'python ', 1) in shipped
    assert '300 test examples at eps 1.5800: clean error 0.1500 (acc 0.8500) | PGD error 0.4333 (acc 0.5667) | ' \
           'certified error 0.8400 (acc 0.1600)' in README
    assert (ROOT / 'pretrained' / 'mnist_relux_sample_best.pth').is_file()


def test_experiment_command_parses_and_finds_its_data_in_a_fresh_clone():
    bounds = load_bounds()
    args = bounds.parse_args(shlex.split(BOUNDS_MNIST)[2:])
    train_set, test_set = bounds.datasets(args)         # the bundled sample, nothing beside the clone
    assert (len(train_set), len(test_set)) == (1500, 100)


def test_experiment_without_cifar_data_ends_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'bounds.py'), '--data', 'cifar10', '--out',
                           str(tmp_path / 'out'), '--subset', str(tmp_path / 'missing.npz')],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.count('\n') == 1 and 'missing.npz' in done.stderr, done.stderr


@pytest.mark.parametrize('command', [
    QUICK_TRAIN, 'python3 train_cifar10.py --help', SHIPPED_EVALUATE, BOUNDS_MNIST,
    'bash run_job.sh mnist', 'bash run_job.sh cifar_6c2f', 'bash TinyImagenet/run_job.sh relux'])
def test_every_script_starts_and_takes_the_flags_before_help(command):
    # --help after the flags: the script imports, its recipe's flags are read, then it prints its help
    argv = shlex.split(command) + ([] if command.endswith('--help') else ['--help'])
    if argv[0] == 'python3':
        argv[0] = sys.executable
    env = {**ENV, 'NPROC': '1', 'PYTHON': sys.executable}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'usage:' in done.stdout


def test_the_download_script_is_valid_bash():
    done = subprocess.run(['bash', '-n', 'TinyImagenet/data/tinyimagenet.sh'], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
