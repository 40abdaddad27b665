"""Certified radii by bisection (radius.py): the bracket agrees with local_bound.certify, radius 0 for
misclassified examples, non-monotone certificates are counted, CSV and certified accuracy."""
import csv

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import evaluation
import local_bound
import models
import radius
from settings import AUTHORS

SHAPE = (1, 12, 12)
SETTINGS = AUTHORS.replace(sniter=30, opt_iter=10)
TOL = 1e-3
ANCHOR = 0.28


@pytest.fixture(scope='module')
def trained():
    """A small ReLU_x network trained for a moment on ten noisy prototypes, and 12 test examples."""
    torch.manual_seed(0)
    model = models.build_sequential(SHAPE, [(1, 8, 4, 2, 1)], [32, 10], models.relux_activation(1.0))
    prototypes = torch.rand(10, *SHAPE)
    g = torch.Generator().manual_seed(1)

    def draw(n):
        y = torch.randint(10, (n,), generator=g)
        return (0.6 * prototypes[y] + 0.4 * torch.rand(n, *SHAPE, generator=g)).clamp(0, 1), y

    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        x, y = draw(64)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, y = draw(12)
    return model, x, y


def starts(model):
    """Start vectors drawn from (seed, example index): repeated certify calls see the same ones."""
    return evaluation.SeededStarts(model, SHAPE, seed=0)


@pytest.fixture(scope='module')
def searched(trained):
    """``certified_radii`` of the 12 examples (eps_max 2, grid 8, tol 1e-3, one anchor)."""
    model, x, y = trained
    store, index = starts(model), torch.arange(len(y))
    out = radius.certified_radii(model, x, y, eps_max=2.0, tol=TOL, anchors=(ANCHOR,), store=store,
                                 index=index, settings=SETTINGS)
    return out, store, index


def test_bisection_bracket_matches_certify(trained, searched):
    model, x, y = trained
    out, store, index = searched
    closed = out['upper'] - out['radius'] <= torch.clamp(TOL * out['radius'], min=2.0 * radius.FLOOR)
    assert (closed | out['capped'] | ~out['correct']).all()       # relative to the radius
    assert (out['upper'][out['correct'] & ~out['capped']] > out['radius'][out['correct'] & ~out['capped']]).all()
    checked = (out['monotone'] & out['correct'] & ~out['capped'] & (out['radius'] > 100 * TOL)).nonzero()
    assert len(checked) >= 10
    for i in checked.squeeze(1).tolist():
        r = float(out['radius'][i])
        x_i, y_i, at = x[i:i + 1], y[i:i + 1], index[i:i + 1]
        assert local_bound.certify(model, x_i, y_i, 0.99 * r, SETTINGS, store=store, index=at).item(), i
        assert not local_bound.certify(model, x_i, y_i, 1.01 * r, SETTINGS, store=store, index=at).item(), i
    first = checked[0]
    bound = local_bound.local_lipschitz(model, x[first], float(out['radius'][first]), SETTINGS)
    assert float(out['local_bound'][first]) == pytest.approx(float(bound), rel=1e-2)


def test_anchor_thresholds_agree_with_certify(trained, searched):
    model, x, y = trained
    out, store, index = searched
    assert out['non_monotone'] == 0
    certified = local_bound.certify(model, x, y, ANCHOR, SETTINGS, store=store, index=index)
    accuracy = radius.certified_accuracy_at(out['radius'], [ANCHOR, 0.0, 2.0], out['correct'])
    assert accuracy[ANCHOR] == pytest.approx(certified.double().mean().item())
    assert 0 < accuracy[ANCHOR] < 1                # the anchor splits the examples
    assert accuracy[0.0] == pytest.approx(out['correct'].double().mean().item())   # clean accuracy
    assert accuracy[2.0] == 0.0


def test_radius_zero_counts_as_clean_accuracy_not_as_certified():
    radii, correct = [0.0, 0.0, 0.3, 0.5], [False, True, True, False]
    accuracy = radius.certified_accuracy_at(radii, [0.0, 0.2, 0.4], correct)
    assert accuracy == {0.0: 0.5, 0.2: 0.25, 0.4: 0.0}
    import numpy as np
    import plots
    curve = plots.certified_fraction(np.array(radii), np.array([0.0, 0.2, 0.4]), np.array(correct))
    assert curve.tolist() == [0.5, 0.25, 0.0]


def test_misclassified_get_radius_zero_and_capped_get_eps_max(trained):
    model, x, y = trained
    wrong = (model(x).argmax(1) + 1) % 10
    out = radius.certified_radii(model, x[:4], wrong[:4], eps_max=1.0, grid=2, tol=1.0, settings=SETTINGS)
    assert not out['correct'].any()
    assert (out['radius'] == 0).all() and (out['upper'] == 0).all()
    assert out['local_bound'].isfinite().all()
    small = radius.certified_radii(model, x[:4], y[:4], eps_max=0.01, grid=1, settings=SETTINGS)
    assert small['capped'].all() and (small['radius'] == 0.01).all()


def test_non_monotone_certificates_are_counted():
    points = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    table = torch.tensor([[True, False, True, False],     # certified again above a failure
                          [True, True, False, False],     # monotone
                          [True, True, True, True],       # capped
                          [True, True, True, True]])      # misclassified
    correct = torch.tensor([True, True, True, False])
    lower, upper, first, monotone = radius._grid_brackets(table, correct, points)
    assert monotone.tolist() == [False, True, True, True]
    assert lower.tolist() == [0.25, 0.5, 1.0, 0.0]
    assert upper.tolist() == [0.5, 0.75, float('inf'), 0.25]
    assert first.tolist() == [1, 2, 4, 0]


def test_dataset_radii_writes_the_csv(trained, tmp_path):
    model, x, y = trained
    loader = DataLoader(TensorDataset(x[:5], y[:5], torch.arange(5)), batch_size=3)
    rows, summary = radius.dataset_radii(model, loader, device='cpu', eps_max=1.0, eval_eps=0.1, grid=2,
                                         tol=0.1, progress=False, settings=SETTINGS)
    assert summary['examples'] == 5 and summary['steps'] >= 1
    path = tmp_path / 'run_radius.csv'
    radius.write_radius_csv(path, rows)
    with open(path) as f:
        read = list(csv.DictReader(f))
    assert tuple(read[0]) == radius.RADIUS_COLUMNS
    assert [int(r['index']) for r in read] == list(range(5))
    glob = local_bound.global_lipschitz(model, sniter=30, input_shape=SHAPE)
    for r in read:
        assert float(r['global_bound']) == pytest.approx(glob, rel=1e-3)
        assert 0 < float(r['local_bound_eps']) <= glob * 1.001
        assert float(r['radius']) >= 0 and r['bound'] == 'local'
        assert int(r['correct']) == int(int(r['prediction']) == int(r['label']))


@pytest.mark.parametrize('bound', ['global', 'refined'])
def test_the_csv_names_the_bound_that_certified(trained, bound):
    """A radius found with the global (or refined) bound says so in the ``bound`` column."""
    model, x, y = trained
    loader = DataLoader(TensorDataset(x[:2], y[:2], torch.arange(2)), batch_size=2)
    rows, _ = radius.dataset_radii(model, loader, device='cpu', eps_max=1.0, grid=2, tol=0.2, progress=False,
                                   settings=SETTINGS.replace(bound=bound))
    assert {row['bound'] for row in rows} == {bound}
