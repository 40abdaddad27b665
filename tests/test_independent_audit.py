"""The independent audit of evaluate.py --audit (``audit.independent_audit``): the float64 reference
and float64 attacks re-check the reported certificates, so a false certificate from a mistake in the
pass's own mask bookkeeping (issue 22: MaxMin followed by ReLU) is caught."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import audit
import checkpoints
import data_load
import evaluate
import local_bound
import models
from helpers import maxmin_relu_trap
from models import ClampGroupSort


def _loader(x, y):
    return [(x, y, torch.arange(len(y)))]


def test_the_independent_audit_refuses_the_maxmin_relu_certificate():
    """Both examples reported as certified: the reference confirms the robust one only, and the
    attacks break the other."""
    model, x, y, eps = maxmin_relu_trap()
    report = audit.independent_audit(model, _loader(x, y), eps, SimpleNamespace(certified_index=torch.tensor([0, 1])),
                                     steps=20, samples=50)
    assert (report.certified, report.reference, report.unconfirmed, report.broken) == (2, '', 1, 1)
    assert report.unconfirmed_indices == [0] and report.broken_indices == [0] and report.failed == 1
    assert report.largest_gap > 0.9
    assert 'audit: 1 of 2 certificates not confirmed by the independent reference' in report.lines()[0]


def test_a_model_above_the_limit_is_attacked_only():
    model, x, y, eps = maxmin_relu_trap()
    report = audit.independent_audit(model, _loader(x, y), eps, SimpleNamespace(certified_index=torch.tensor([0, 1])),
                                     steps=20, samples=50, limit=2)
    assert 'limit of 2 entries' in report.reference and report.unconfirmed == 0 and report.broken_indices == [0]
    assert 'attacks only' in report.lines()[0]


def test_nothing_reported_nothing_to_check():
    model, x, y, eps = maxmin_relu_trap()
    report = audit.independent_audit(model, _loader(x, y), eps, SimpleNamespace(certified_index=torch.tensor([])))
    assert (report.certified, report.failed) == (0, 0)


@pytest.fixture
def trap_registered(tmp_path):
    """A data set holding the two trap inputs and a model of the trap's architecture, registered, and
    the trap's weights saved as a checkpoint."""
    model, x, y, _ = maxmin_relu_trap()
    data_load.register_dataset(data_load.DatasetSpec(
        'trap', (2,), 2, lambda *args: (TensorDataset(x, y), TensorDataset(x, y))))
    models.register_model('trap', 'maxmin_relu', lambda init: nn.Sequential(
        nn.Linear(2, 2), ClampGroupSort([1, 1], 1.0, -1.0), nn.ReLU(), nn.Linear(2, 2)))
    checkpoints.atomic_save({'state_dict': model.state_dict()}, str(tmp_path / 'trap_best.pth'))
    yield ['--data', 'trap', '--model', 'maxmin_relu', '--saved_model', str(tmp_path / 'trap'), '--epsilon', '0.5',
           '--no_pgd', '--audit', '--strict', '--workers', '0', '--device', 'cpu', '--niter', '20']
    del data_load.DATASETS['trap'], models.MODELS[('trap', 'maxmin_relu')]


def _failed_audit_lines(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        evaluate.main(argv)
    assert stop.value.code == 1
    return [line for line in capsys.readouterr().out.splitlines() if 'audit: ' in line]


def test_evaluate_audit_catches_the_pass_certifying_the_maxmin_relu_trap(trap_registered, capsys):
    """evaluate.py --audit --strict never passes a false certificate: with the MaxMin -> ReLU bug of
    issue 22 the pass certifies both inputs, the converged re-check (which shares the pass's masks)
    keeps both, and the independent audit fails one and exits 1; once the pass is fixed it does not
    certify the trap and the audit passes."""
    try:
        result = evaluate.main(trap_registered)
    except SystemExit as stop:
        assert stop.code == 1
        out = capsys.readouterr().out
        assert 'audit: 1 of 2 certificates not confirmed by the independent reference' in out
        assert 'audit: 1 of 2 certified examples broken by float64 PGD' in out
    else:
        assert result['stats'].certified_index.tolist() == [1]
        assert result['independent'].failed == 0 and result['independent'].certified == 1


def test_evaluate_audit_fails_on_a_forced_false_certificate(trap_registered, capsys, monkeypatch):
    """Every correct prediction reported as certified (a pass that over-certifies, whatever the state
    of the MaxMin fix): the independent audit fails the trap and --strict exits 1."""
    monkeypatch.setattr(local_bound, 'certified_predictions', lambda out, y: local_bound.correct_predictions(out.logits, y))
    lines = _failed_audit_lines(trap_registered, capsys)
    assert any('1 of 2 certificates not confirmed by the independent reference' in line for line in lines)
    assert any('1 of 2 certified examples broken' in line for line in lines)
