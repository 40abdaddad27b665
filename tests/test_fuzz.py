"""The randomised-architecture fuzz of the certifier (``fuzzing.py``) on fixed seeds, and the
float64 reference it checks against (``reference.py``): the reference agrees with the tests'
own references, refuses a certificate that an attack breaks, and the fuzz fails when the pass is
made to over-certify."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import fuzzing
import local_bound
import reference
from helpers import exact_translation, maxmin_relu_trap, reference_pass, small_conv_net, small_mlp

SEEDS = range(32)          # about 25 s on one thread
QUICK = fuzzing.Effort(samples=8, eps_factors=(0.5, 1.0, 2.0), steps=30, restarts=2, points=200)


def test_random_architectures_certify_soundly(one_thread):
    """Every certificate of the guaranteed default and of the refined bound survives float64 PGD and
    sampling, is confirmed by the reference, and every norm is at least the reference's."""
    findings = fuzzing.run(SEEDS, QUICK)
    assert findings.certificates > 300 and findings.norms > 2000, findings.summary()
    if findings.failures:
        pytest.fail(findings.report(), pytrace=False)


def test_the_seeds_cover_every_layer_and_motif():
    layers, motifs = set(), set()
    for seed in SEEDS:
        net = fuzzing.random_network(seed)
        layers |= {name.split('(')[0] for name in net.layers}
        motifs |= net.motifs
    assert layers == {'Linear', 'Conv', 'Flatten', 'nn.Flatten', 'ReLU', 'ReLUx', 'MaxMin'}
    assert motifs == {'MaxMin->ReLU', 'MaxMin->ReLUx', 'activation->activation', 'affine->affine',
                      'activation first', 'grouped conv'}


def test_an_over_certifying_pass_fails_the_fuzz(one_thread, monkeypatch):
    """The guaranteed local product scaled by 0.3: the fuzz reports norms below the reference and
    certificates the reference does not confirm (proof that the checks can fail)."""
    real = local_bound.guaranteed_local_product

    def optimistic(*args, **kwargs):
        product, column, norms, certified = real(*args, **kwargs)
        if column is not None:                      # the decision of a 0.3 times smaller radius
            state, last, y, eps = args[:4]
            certified, column = local_bound.rigorous_decision(last, y, state, eps * product * 0.3)
        return product * 0.3, column, {i: n * 0.3 for i, n in norms.items()}, certified

    monkeypatch.setattr(local_bound, 'guaranteed_local_product', optimistic)
    findings = fuzzing.run(range(4), QUICK)
    kinds = {(f.kind, f.settings) for f in findings.failures}
    assert {('norm below reference', 'default'), ('unconfirmed', 'default')} <= kinds, findings.summary()


# ----------------------------------------------------------------------------- the reference itself

def test_the_reference_translation_is_exact():
    """``ball_box_maximum`` against the tests' bisection (numpy) on random problems."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        h = int(torch.randint(1, 9, (1,), generator=generator))
        w = torch.randn(h, generator=generator, dtype=torch.float64)
        lower = -torch.rand(h, generator=generator, dtype=torch.float64)
        upper = torch.rand(h, generator=generator, dtype=torch.float64)
        radius = float(torch.rand(1, generator=generator)) * 1.5
        ours = float(reference.ball_box_maximum(w[None], lower[None], upper[None],
                                                    torch.tensor([radius], dtype=torch.float64)))
        assert ours == pytest.approx(exact_translation(w, lower, upper, radius), rel=1e-9, abs=1e-12)
        assert ours >= exact_translation(w, lower, upper, radius) - 1e-12


@pytest.mark.parametrize('kind', ['relu', 'relux', 'maxmin'])
def test_the_reference_is_never_looser_than_the_papers_pass(kind):
    """Against the tests' own pass of docs/method.md §2 (helpers.reference_pass, exact global norms):
    the reference's penultimate box lies inside it and its product of norms is at most the paper's."""
    for model, x in ((small_mlp(kind, seed=1), torch.rand(4, 10, dtype=torch.float64)),
                     (small_conv_net(kind, seed=2), torch.rand(2, 2, 7, 7, dtype=torch.float64))):
        eps = 0.05
        ours = reference.Reference(model, x.shape[1:]).bounds(x, eps)
        theirs = reference_pass(model, x, eps)
        for b, paper in enumerate(theirs):
            assert (ours.lower[b] >= paper['lower'].flatten() - 1e-12).all()
            assert (ours.upper[b] <= paper['upper'].flatten() + 1e-12).all()
            product = math.prod(float(n[b]) for n in ours.norms.values())
            assert product <= paper['local_product'] * (1 + 1e-9)
            assert float(ours.radius[b]) == pytest.approx(eps * product)


def test_the_reference_refuses_a_certificate_an_attack_breaks():
    model, x, y, eps = maxmin_relu_trap()
    x, y = x[:1], y[:1]
    ref = reference.Reference(model, (2,))
    gap = reference.attack_gaps(reference.float64_copy(model), x, y, eps, steps=20, restarts=2, samples=50)
    assert float(gap) > 0.9                           # at most 1 = z_1 - z_0 at (0.7, 0)
    assert not ref.certified(x, y, eps)
    assert ref.certified(x, y, 0.2)                   # b <= -0.1 < 0: the ReLU keeps the max at 0
    assert ref.bounds(x, eps).out_masks[0].tolist() == [[True, True]]


def test_the_reference_refuses_what_it_does_not_model():
    assert 'not modelled' in reference.cannot_check(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), (4,))
    big = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    assert 'limit' in reference.cannot_check(big, (64,), limit=1000)
    assert reference.cannot_check(big, (64,)) == ''
    with pytest.raises(reference.ReferenceError):
        reference.Reference(big, (64,), limit=1000)
