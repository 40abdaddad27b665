"""The shipped checkpoint: its README command prints the numbers pretrained/README.md quotes."""
import re
from pathlib import Path

import pytest

import evaluate

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_shipped_checkpoint_prints_the_quoted_numbers(capsys, monkeypatch):
    readme = (ROOT / 'pretrained' / 'README.md').read_text()
    command = re.search(r'^    python evaluate\.py (.*mnist_relux_sample.*)$', readme, re.M).group(1).split()
    quoted = re.search(r'^    (300 test examples at eps .*)$', readme, re.M).group(1)
    monkeypatch.chdir(ROOT)
    evaluate.main(command + ['--device', 'cpu'])
    out = capsys.readouterr().out
    assert quoted in out, out
    assert 'guaranteed norms' in out
