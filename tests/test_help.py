"""--help of every script: each option shows its default (or says it is required, or is a switch),
once; parser errors are one line (exit status 2)."""
import importlib.util
import re
import subprocess
import sys

import pytest

import audit
import compare
import evaluate
import plots
import train_cifar10
import train_mnist
from helpers import ROOT
from lolip import main as lolip_main
from lolip import prepare_restricted_imagenet


def load_script(path, monkeypatch):
    """The module of a script outside the root package (its folder goes on sys.path first)."""
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry_points(monkeypatch):
    """{script: function that parses an argv list}."""
    tiny = load_script(ROOT / 'TinyImagenet' / 'train_tiny_multi.py', monkeypatch)
    tiny_eval = load_script(ROOT / 'TinyImagenet' / 'evaluate_tiny.py', monkeypatch)
    bounds = load_script(ROOT / 'experiments' / 'bounds.py', monkeypatch)
    return {
        'train_mnist.py': lambda argv: train_mnist.parse(argv=argv),
        'train_cifar10.py': lambda argv: train_cifar10.parse(argv=argv),
        'evaluate.py': evaluate.parse_args, 'audit.py': audit.parse_args,
        'compare.py': lambda argv: compare.parser().parse_args(argv), 'plots.py': plots.parse_args,
        'experiments/bounds.py': bounds.parse_args, 'TinyImagenet/train_tiny_multi.py': tiny.parse,
        'TinyImagenet/evaluate_tiny.py': tiny_eval.parse,
        'lolip/main.py': lambda argv: lolip_main.parser().parse_args(argv),
        'lolip/prepare_restricted_imagenet.py': prepare_restricted_imagenet.main,
    }


SCRIPTS = ['train_mnist.py', 'train_cifar10.py', 'evaluate.py', 'audit.py', 'compare.py', 'plots.py',
           'experiments/bounds.py', 'TinyImagenet/train_tiny_multi.py', 'TinyImagenet/evaluate_tiny.py',
           'lolip/main.py', 'lolip/prepare_restricted_imagenet.py']


def help_entries(text):
    """[(invocation, help text)] of every option in a --help output."""
    entries = []
    for line in text.splitlines():
        line = line.rstrip()
        if re.match(r'^  -', line):
            invocation, _, rest = line.strip().partition('  ')
            entries.append([invocation, rest.strip()])
        elif entries and re.match(r'^ {4,}\S', line):
            entries[-1][1] += ' ' + line.strip()
    return [(invocation, help_text.strip()) for invocation, help_text in entries]


def is_switch(invocation):
    """An option that takes no value: no metavar after any of its spellings ('-h, --help')."""
    return all(' ' not in spelling for spelling in invocation.split(', '))


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_option_shows_its_default(script, monkeypatch, capsys):
    with pytest.raises(SystemExit) as stop:
        entry_points(monkeypatch)[script](['--help'])
    assert stop.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    assert len(entries) > 2
    for invocation, text in entries:
        assert text, invocation
        if is_switch(invocation):
            continue
        assert re.search(r'default: |\(required\)|required:', text), (invocation, text)
        assert '(default: None)' not in text and text.count('default') <= 1, (invocation, text)


def test_help_shows_choices_and_the_defaults_the_docs_name(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        train_cifar10.parse(argv=['--help'])
    entries = dict(help_entries(capsys.readouterr().out))
    assert entries['--data {cifar10}'] == 'data set (default: cifar10)'
    assert entries['--opt {adam,sgd}'] == 'optimiser (default: adam)'
    assert 'c6f2_relux' in entries['--model MODEL'] and '(default: c6f2_relux)' in entries['--model MODEL']
    assert entries['--epochs EPOCHS'] == 'training epochs (default: 800)'
    assert entries['--prefix PREFIX'].endswith('(default: temporary)')       # as pretrained/README.md says
    assert entries['--alpha ALPHA'] == 'PGD step size (default: --epsilon / 4)'


@pytest.mark.parametrize('argv, message', [
    (['--data', 'mnist'], "argument --data: invalid choice: 'mnist' (choose from 'cifar10')"),
    (['--epochs', 'ten'], "argument --epochs: invalid int value: 'ten'"),
    (['--rampup', '0'], '--rampup must be at least 1'),
])
def test_parser_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        train_cifar10.parse(argv=argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and message in err and '--help' in err and 'usage' not in err


def test_a_training_script_refuses_another_data_set_in_one_line():
    done = subprocess.run([sys.executable, str(ROOT / 'train_cifar10.py'), '--data', 'mnist'], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ''
    assert done.stderr == ("train_cifar10.py: error: argument --data: invalid choice: 'mnist' (choose from "
                           "'cifar10') (see train_cifar10.py --help)\n")
