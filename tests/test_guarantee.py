"""Guaranteed norms and the routes to a false certificate an adversarial review found.

* the probabilistic Lanczos bound holds empirically (observed failure rate <= the theorem's), and
  only because of its inflation;
* guaranteed norms are >= the float64 SVD of the explicit masked matrix (random, degenerate layers);
* one constructed model per class of false certificate: the library's defaults certify none falsely,
  and each entry point refuses what the pass does not model.
"""
import inspect
import math

import pytest
import torch
import torch.nn as nn

import evaluation
import guaranteed
import local_bound as lb
import radius
import ranks
import spectral
from settings import AUTHORS, CERTIFIED, LANCZOS, TRAINING, BoundSettings
from helpers import explicit_matrix


def explicit_masked(layer, in_shape, in_mask=None, out_mask=None):
    """[B, n_out, n_in] float64 explicit matrices of D_out W D_in (one per sample)."""
    matrix = explicit_matrix(layer.double(), in_shape)
    layer.float()
    batch = 1 if in_mask is None else in_mask.size(0)
    m = matrix.expand(batch, -1, -1).clone()
    if out_mask is not None:
        m = m * out_mask.double().flatten(1).unsqueeze(2)
    if in_mask is not None:
        m = m * in_mask.double().flatten(1).unsqueeze(1)
    return m


def linear_with_singular_values(values, n_in=None, seed=0):
    """nn.Linear(n_in, len(values)) with exactly these singular values (float32)."""
    gen = torch.Generator().manual_seed(seed)
    n_out, n_in = len(values), n_in or len(values)
    u, _ = torch.linalg.qr(torch.randn(n_out, n_out, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n_in, n_out, generator=gen, dtype=torch.float64))
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(torch.as_tensor(values, dtype=torch.float64)) @ v.t())
    return layer, u, v


# ----------------------------------------------------------------------------- the theorem

@pytest.mark.parametrize('steps,delta', [(6, 0.9), (8, 0.5), (12, 0.2)])
def test_lanczos_failure_rate_is_within_the_theorem(steps, delta):
    """10^4 uniform starts on a 100 x 100 matrix whose top pair is 0.05% apart: the rate of
    theta_k < (1 - e) lambda_max is at most delta, and the guaranteed bound falls below the norm
    at most as often; without the inflation (the estimate) it is below nearly always."""
    n = 100
    values = torch.cat([torch.tensor([1.0, 0.9995]), torch.linspace(0, 0.95, n - 2).sqrt()]).sort(descending=True).values
    layer, _, _ = linear_with_singular_values(values, seed=3)
    layer = layer.double()
    op = lb.make_operator(layer, (n,))
    starts = torch.randn(10_000, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    run = guaranteed.KrylovRun(op, None, None, starts, dtype=torch.float64)
    run.advance(steps)
    estimate, upper = run.bounds(delta)
    e = guaranteed.kw_relative_error(steps, torch.tensor(float(n)), delta)
    assert 0 < float(e) < 1
    failures = (estimate ** 2 < (1 - e) * 1.0).double().mean().item()
    assert failures <= delta
    assert (upper < 1.0).double().mean().item() <= delta
    assert (estimate < 1.0 - 1e-9).double().mean().item() > 0.99      # what the inflation buys


def test_relative_error_shrinks_with_steps_and_grows_with_confidence():
    dims = torch.tensor([1000.0])
    e = [float(guaranteed.kw_relative_error(k, dims, 1e-10)) for k in (32, 64, 128, 256)]
    assert all(a > b for a, b in zip(e, e[1:]))
    assert float(guaranteed.kw_relative_error(64, dims, 1e-12)) > e[1]
    assert float(guaranteed.kw_relative_error(1, dims, 1e-10)) == math.inf
    assert float(guaranteed.kw_relative_error(5, torch.tensor([1.0]), 1e-10)) == 0.0


@pytest.mark.parametrize('guess', ['dense', 'none', 'high', 'low', 'off_by_rtol'])
def test_sturm_bracket_contains_the_top_eigenvalue(guess, monkeypatch):
    """The bracket holds whatever the dense solver's guess: right, absent (bisection only), far too
    high or low, or just outside the guessed points; the Sturm counts alone decide its ends."""
    scale = {'high': 1.5, 'low': 0.5, 'off_by_rtol': 1 + 1e-12}.get(guess)
    if guess == 'none':
        monkeypatch.setattr(guaranteed, 'DENSE_BRACKET_LIMIT', 0)
    elif scale is not None:
        dense = guaranteed._dense_top_eigenvalue

        def misguided(diag, off):
            top = dense(diag, off)
            return None if top is None else top * scale
        monkeypatch.setattr(guaranteed, '_dense_top_eigenvalue', misguided)
    gen = torch.Generator().manual_seed(0)
    for k in (1, 2, 7, 60):
        diag = torch.rand(5, k, generator=gen, dtype=torch.float64) * 3
        off = torch.randn(5, max(k - 1, 0), generator=gen, dtype=torch.float64)
        if k == 7:       # a double top eigenvalue: two copies of one 3x3 block around a zero entry
            a, b, c, x, y = diag[0, :3].tolist() + off[0, :2].tolist()
            diag[0] = torch.tensor([a, b, c, 0.0, a, b, c], dtype=torch.float64)
            off[0] = torch.tensor([x, y, 0.0, 0.0, x, y], dtype=torch.float64)
        low, high = guaranteed.top_eigenvalue_bracket(diag, off)
        t = torch.diag_embed(diag)
        if k > 1:
            t = t + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        top = torch.linalg.eigvalsh(t)[:, -1]
        assert (low <= top + 1e-12).all() and (top <= high + 1e-12).all()
        assert ((high - low) <= 1e-12 * high.abs() + 1e-300).all()


def test_dense_guess_only_where_cheaper_than_bisection():
    """The dense solve is skipped above DENSE_BRACKET_LIMIT entries (it costs m k^2 memory): many
    short runs or one long one fall back to bisection alone."""
    limit = guaranteed.DENSE_BRACKET_LIMIT
    for m, k in ((limit // 32 ** 2 + 1, 32), (1, 2048)):
        assert guaranteed._dense_top_eigenvalue(torch.ones(m, k, dtype=torch.float64),
                                                torch.ones(m, k - 1, dtype=torch.float64)) is None
    top = guaranteed._dense_top_eigenvalue(torch.ones(2, 512, dtype=torch.float64),
                                           torch.zeros(2, 511, dtype=torch.float64))
    assert torch.equal(top, torch.ones(2, dtype=torch.float64))


# ----------------------------------------------------------------------------- upper bounds

def _check_upper(layer, in_shape, in_mask, out_mask, steps=128):
    truth = torch.linalg.matrix_norm(explicit_masked(layer, in_shape, in_mask, out_mask), ord=2)
    op = lb.make_operator(layer, in_shape)
    batch = in_mask.size(0)
    starts = torch.randn(batch, *in_shape, generator=torch.Generator().manual_seed(5))
    run = guaranteed.KrylovRun(op, in_mask, out_mask, starts)
    run.advance(steps)
    estimate, upper = run.bounds(1e-12)
    exact = guaranteed.explicit_norm_bounds(op, in_mask, out_mask, batch)
    assert (upper >= truth).all(), (upper - truth).min()
    assert (exact >= truth).all() and (exact <= truth * (1 + 1e-6) + 1e-9).all()
    finite = truth > 0
    assert (upper[finite] <= truth[finite] * 1.05).all()          # not vacuous after 128 steps
    assert (upper[~finite] < 1e-10).all()                          # at most the underflow floor
    return estimate, upper, truth


def test_guaranteed_norm_is_above_the_svd_of_random_masked_layers():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    shape = (3, 8, 8)
    in_mask = (torch.rand(6, *shape) > 0.4).float()
    out_mask = (torch.rand(6, 8, 4, 4) > 0.3).float()
    in_mask[0] = 0                                      # empty mask: norm 0
    out_mask[1] = 0
    _check_upper(conv, shape, in_mask, out_mask)
    linear = nn.Linear(40, 30)
    _check_upper(linear, (40,), (torch.rand(5, 40) > 0.5).float(), (torch.rand(5, 30) > 0.5).float())


def test_guaranteed_norm_on_degenerate_layers():
    """Rank one, a repeated top singular value, a near-degenerate top pair, tiny and huge scales."""
    rank_one = nn.Linear(30, 20)
    with torch.no_grad():
        rank_one.weight.copy_(torch.randn(20, 1) @ torch.randn(1, 30))
    masks = (torch.ones(3, 30), torch.ones(3, 20))
    _check_upper(rank_one, (30,), *masks)
    repeated, _, _ = linear_with_singular_values([2.0, 2.0, 2.0] + [0.5] * 17, n_in=30)
    _check_upper(repeated, (30,), *masks)
    near, _, _ = linear_with_singular_values([1.0, 0.98] + [0.1] * 18, n_in=30)
    _check_upper(near, (30,), *masks)
    for scale in (1e-20, 1e20):
        scaled = nn.Linear(30, 20)
        with torch.no_grad():
            scaled.weight.mul_(scale)
        _check_upper(scaled, (30,), *masks)


def test_global_norm_bound_is_above_the_svd_and_follows_weight_changes():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    op = lb.make_operator(conv, (4, 10, 10))
    truth = float(torch.linalg.matrix_norm(explicit_masked(conv, (4, 10, 10))[0], ord=2))
    probabilistic = guaranteed.KrylovRun(op, None, None, torch.randn(1, 4, 10, 10, dtype=torch.float64),
                                         dtype=torch.float64)
    probabilistic.advance(512)
    assert float(probabilistic.bounds(1e-12)[1][0]) >= truth
    first = guaranteed.global_norm_bound(op, 512, 1e-12, 0)
    assert truth <= first <= truth * (1 + 1e-6)
    conv.weight.data.mul_(2)           # through .data: no version counter moves
    assert guaranteed.global_norm_bound(op, 512, 1e-12, 0) == pytest.approx(2 * first, rel=1e-9)


# ----------------------------------------------------------------------------- constructed cases

def dead_neuron_trap(gap=0.98, eps=1.0):
    """A model where a neuron is inactive at x but not in the ball, seen only by the top singular
    vector: row 0 of the first layer is v1 (norm 1 = the top singular value), its bias puts the
    neuron at -0.99 eps, and the last layer turns it into the other class with weight 1000.
    Returns (model, x, y, eps, the flipping point x + eps v1, the second singular vector u2)."""
    n = 20
    gen = torch.Generator().manual_seed(0)
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    first = nn.Linear(n, n)
    with torch.no_grad():
        first.weight.copy_((torch.diag(torch.tensor([1.0, gap] + [0.5] * (n - 2), dtype=torch.float64)) @ v.t()))
        first.bias.zero_()
        first.bias[0] = -0.99 * eps
        first.bias[1:] = -100.0                        # the other neurons stay dead
    last = nn.Linear(n, 2)
    with torch.no_grad():
        last.weight.zero_()
        last.weight[1, 0] = 1000.0
        last.bias.copy_(torch.tensor([3.0, 0.0]))
    model = nn.Sequential(first, nn.ReLU(), last)
    x = torch.zeros(1, n)
    y = torch.tensor([0])
    flip = x + eps * v[:, 0].float().view(1, -1)
    u2 = torch.zeros(1, n)
    u2[0, 1] = 1.0
    return model, x, y, eps, flip, u2


def test_a_stale_global_vector_cannot_make_the_default_certify_falsely():
    model, x, y, eps, flip, u2 = dead_neuron_trap()
    with torch.no_grad():
        assert model(flip).argmax(1).item() == 1 and model(x).argmax(1).item() == 0   # truly not robust
    spectral.set_warm_vector(model[0], u2.clone())    # the second singular vector, as a stale store
    assert lb.certify(model, x, y, eps, LANCZOS.replace(sniter=50)).item()   # the estimate is fooled
    spectral.set_warm_vector(model[0], u2.clone())
    assert not lb.certify(model, x, y, eps).item()                          # the default is not
    assert not lb.certify(model, x, y, eps, CERTIFIED.replace(exact_below=0)).item()


def test_library_defaults_are_the_guaranteed_procedure():
    for fn in (lb.certify, lb.bound_outputs, lb.local_lipschitz, lb.layer_norms, radius.certified_radii):
        assert inspect.signature(fn).parameters['settings'].default is CERTIFIED, fn.__name__
    assert CERTIFIED.guaranteed and not LANCZOS.guaranteed and not AUTHORS.guaranteed


def small_relu_net(seed=0, scale_first=1.0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].weight.mul_(scale_first)
        model[2].weight.div_(scale_first)
        model[0].bias.mul_(scale_first)
    return model


def test_scaling_one_layer_down_and_the_next_up_changes_no_bound():
    """The same function with the first layer x1e-13 and the second x1e13: same bounds (relative)."""
    x = torch.rand(16, 12)
    plain, scaled = small_relu_net(), small_relu_net(scale_first=1e-13)
    y = plain(x).argmax(1)
    for settings in (CERTIFIED.replace(exact_below=0), LANCZOS, AUTHORS.replace(sniter=300)):
        a = lb.bound_outputs(plain, x, y, 0.05, settings)
        b = lb.bound_outputs(scaled, x, y, 0.05, settings)
        assert torch.allclose(a.lipschitz, b.lipschitz, rtol=2e-3), settings.method
        assert torch.equal(lb.certified_predictions(a, y), lb.certified_predictions(b, y))


def test_overflowing_radii_are_refused_or_never_certified():
    model = small_relu_net()
    x = torch.rand(4, 12)
    y = model(x).argmax(1)
    for eps in (3e38, 1e20, 2e4):
        with pytest.raises(lb.BoundError, match='at most'):
            lb.certify(model, x, y, eps)
    huge = small_relu_net()
    with torch.no_grad():
        for layer in (huge[0], huge[2]):
            layer.weight.mul_(1e18)
    y = huge(x).argmax(1)
    for settings in (CERTIFIED, LANCZOS, AUTHORS.replace(sniter=50)):
        out = lb.bound_outputs(huge, x, y, 1e3, settings)
        assert not lb.certified_predictions(out, y).any(), settings.method


def test_a_non_finite_box_is_never_certified():
    """Finite logits at the centre, but a box that overflows: the authors' NaN -> 0 rule would have
    turned its translation into 0 (certified); every preset refuses it."""
    model = small_relu_net()
    x = torch.rand(4, 12)
    x[:, 0] = 0.0
    with torch.no_grad():
        model[0].weight[:, 0] = 1e37               # no effect at the centre, inf in the box
    y = model(x).argmax(1)
    for settings in (CERTIFIED, LANCZOS, AUTHORS.replace(sniter=20)):
        out = lb.bound_outputs(model, x, y, 100.0, settings)
        assert torch.isfinite(out.logits).all()
        assert not out.finite.any() and not lb.certified_predictions(out, y).any(), settings.method


def test_nan_bounds_count_as_varying():
    state = lb.BoundState(torch.zeros(1, 3), torch.zeros(1), torch.tensor([[math.nan, -1.0, 1.0]]),
                          torch.tensor([[1.0, math.nan, 2.0]]))
    relu = lb.rule_for(nn.ReLU())(nn.ReLU(), 0, state, lb.PassOptions(CERTIFIED))
    assert relu.mask.tolist() == [[1.0, 1.0, 1.0]]
    clipped = lb.rule_for(lb.ReLU_x((1, 3), 0.5))(lb.ReLU_x((1, 3), 0.5), 0, state, lb.PassOptions(CERTIFIED))
    assert clipped.mask.tolist() == [[1.0, 1.0, 0.0]]          # 1 > 0.5: saturated, fixed


@pytest.mark.parametrize('layer,why', [
    (nn.Conv2d(2, 4, 3, padding=1, padding_mode='circular'), 'padding_mode'),
    (nn.Conv2d(2, 4, 3, padding=1, padding_mode='reflect'), 'padding_mode'),
    (nn.Conv2d(2, 4, 3, padding=1, padding_mode='replicate'), 'padding_mode'),
    (nn.Conv2d(2, 4, 3, padding=2, dilation=2), 'dilation'),
    (nn.Conv2d(2, 4, 3, padding='same'), 'padding'),
    (nn.Flatten(start_dim=2), 'start_dim'),
    (nn.Tanh(), 'no bound rule'),
    (type('MyReLU', (nn.ReLU,), {'forward': lambda self, x: x})(), 'no bound rule'),
])
def test_unmodelled_layers_are_refused_with_one_line(layer, why):
    model = nn.Sequential(nn.Conv2d(2, 2, 1), layer, nn.Flatten(), nn.LazyLinear(3))
    x = torch.rand(2, 2, 6, 6)
    model(x)
    with pytest.raises(lb.BoundError, match=why) as error:
        lb.certify(model, x, torch.tensor([0, 1]), 0.1)
    assert '\n' not in str(error.value) and 'layer 1' in str(error.value)


def test_conv_flatten_relu_is_modelled_and_sound():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Flatten(), nn.ReLU(), nn.Linear(48, 3))
    x = torch.rand(32, 1, 4, 4)
    y = model(x).argmax(1)
    eps = 0.02
    out = lb.bound_outputs(model, x, y, eps)
    cert = lb.certified_predictions(out, y)
    assert cert.any()
    _assert_no_attack_breaks(model, x[cert], y[cert], eps)


def _assert_no_attack_breaks(model, x, y, eps):
    import attacks
    margin = attacks.margins(model, x, y)
    for start in ('image', 'uniform'):
        adv = attacks.pgd(model, x, y, eps, norm=2, steps=50, step_size=eps / 4, random_start=start)
        margin = torch.minimum(margin, attacks.margins(model, adv, y))
    _, found = attacks.random_search(model, x, y, eps, norm=2, samples=200)
    assert (torch.minimum(margin, found) > 0).all()


def test_guaranteed_certificates_survive_attacks_on_a_trained_net():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.rand(256, 10)
    y = (x[:, 0] > x[:, 1]).long() + (x[:, 2] > 0.7).long()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(150):
        worst = lb.worst_case_logits(model, x, y, 0.05, TRAINING.replace(sniter=2))
        loss = nn.functional.cross_entropy(worst, y) + nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for settings in (CERTIFIED, CERTIFIED.replace(exact_below=0)):
        cert = lb.certify(model, x, y, 0.05, settings)
        assert cert.sum() >= 20, int(cert.sum())
        _assert_no_attack_breaks(model, x[cert], y[cert], 0.05)
    # the guaranteed default certifies what the converged estimate does, up to the inflation
    estimate = lb.certify(model, x, y, 0.05, LANCZOS)
    assert not (lb.certify(model, x, y, 0.05) & ~estimate).any()


def test_certifying_twice_or_after_restoring_the_weights_gives_the_same_decisions():
    model = small_relu_net(seed=2)
    x = torch.rand(64, 12)
    y = model(x).argmax(1)
    settings = CERTIFIED.replace(exact_below=0)
    first = lb.bound_outputs(model, x, y, 0.03, settings)
    again = lb.bound_outputs(model, x, y, 0.03, settings)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[2].weight.mul_(3)
    lb.certify(model, x, y, 0.03, settings)
    model.load_state_dict(saved)
    restored = lb.bound_outputs(model, x, y, 0.03, settings)
    for out in (again, restored):
        assert torch.equal(out.lipschitz, first.lipschitz)
        assert torch.equal(lb.certified_predictions(out, y), lb.certified_predictions(first, y))


def test_zero_stored_vectors_are_redrawn():
    model = small_relu_net()
    x = torch.rand(6, 12)
    y = model(x).argmax(1)
    store = lb.SingularVectorStore(model, (12,), 6, seed=0)
    for v in store.vectors.values():
        v.zero_()
    out = lb.bound_outputs(model, x, y, 0.01, AUTHORS.replace(sniter=200), store=store, index=torch.arange(6))
    fresh = lb.bound_outputs(model, x, y, 0.01, AUTHORS.replace(sniter=200))
    assert torch.allclose(out.lipschitz, fresh.lipschitz, rtol=1e-2)
    assert all((v.flatten(1).norm(dim=1) > 0.5).all() for v in store.vectors.values())
    store.scatter(torch.arange(2), {0: torch.zeros(2, 12), 2: torch.full((2, 16), math.nan)})
    assert all(torch.isfinite(v).all() and (v.flatten(1).norm(dim=1) > 0.5).all() for v in store.vectors.values())


def test_settings_are_validated():
    for bad in (dict(method='magic'), dict(failure_prob=0.0), dict(failure_prob=1.5), dict(sniter=0),
                dict(method='lanczos', power_grad='final'), dict(tol=-1.0)):
        with pytest.raises(ValueError):
            BoundSettings(**bad)
    with pytest.raises(TypeError):
        lb.bound_outputs(small_relu_net(), torch.rand(1, 12), torch.tensor([0]), 0.1, {'sniter': 3})


def test_the_convergence_audit_checks_the_reported_certificates():
    """A weak estimate reports a false certificate (stale warm vector); the warm vector converges
    before the audit: the audit still re-checks that certificate, and finds that it does not hold."""
    from types import SimpleNamespace

    import audit
    model, x, y, eps, _, u2 = dead_neuron_trap()
    args = SimpleNamespace(sniter=1, test_sniter=50, opt_iter=1, test_opt_iter=1, gloro=False, bound='local',
                           spectral='lanczos', translation='exact', seed=0, failure_prob=1e-9)
    loader = [(x, y, torch.tensor([7]))]
    runtime = ranks.Runtime(torch.device('cpu'))
    spectral.set_warm_vector(model[0], u2.clone())
    reported = evaluation.evaluate_certified(model, loader, args, runtime, eps)
    assert reported.certified_index.tolist() == [7]
    converged = torch.zeros(1, 20)
    converged[0, 0] = 1.0                                           # the warm vector converges ...
    spectral.set_warm_vector(model[0], converged)
    rerun = evaluation.evaluate_certified(model, loader, args, runtime, eps)
    assert rerun.certified_index.tolist() == []                     # ... so a re-run certifies nothing
    before = spectral.warm_vector(model[0]).clone()
    report = audit.convergence_audit(model, loader, args, runtime, eps, reported)
    assert (report.certified, report.flipped, report.checked) == (1, 1, [7])
    assert report.global_underestimate == pytest.approx(1 / 0.98 - 1, rel=1e-3)   # sigma_2 was used
    assert torch.equal(spectral.warm_vector(model[0]), before)                    # the audit moved nothing
    args.spectral = 'guaranteed'
    honest = evaluation.evaluate_certified(model, loader, args, runtime, eps)
    assert honest.certified_index.tolist() == [] and honest.failure_prob == 1e-9


@pytest.mark.parametrize('flag,value', [('--epsilon', '3e38'), ('--epsilon', '2e4'), ('--failure_prob', '0'),
                                        ('--failure_prob', '1.5'), ('--epsilon', 'nan')])
def test_evaluate_refuses_radii_and_budgets_out_of_range(flag, value, capsys):
    import evaluate
    with pytest.raises(SystemExit) as stop:
        evaluate.parse_args(['--data', 'mnist', '--model', 'relux', flag, value])
    assert stop.value.code == 2 and flag in capsys.readouterr().err


def test_a_model_without_hidden_layers_is_certified_by_its_margin():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    x = torch.rand(8, 5)
    y = model(x).argmax(1)
    assert torch.equal(lb.certify(model, x, y, 0.0), lb.correct_predictions(model(x), y))
    assert torch.equal(lb.local_lipschitz(model, x, 0.1), torch.ones(8))


@pytest.mark.parametrize('conv,shape', [
    (nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 7, 7)),
    (nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(0, 1), bias=False), (3, 8, 7)),
    (nn.Conv2d(2, 4, 4, stride=2, padding=1), (2, 9, 9)),
    (nn.Conv2d(2, 2, 1, stride=3), (2, 8, 8)),
])
def test_conv_geometries_are_modelled_exactly(conv, shape):
    """Groups, rectangular kernels and strides, no bias, strides dropping rows: the operator is the
    conv without bias, its adjoint the transpose, and the guaranteed bound is above the SVD."""
    torch.manual_seed(0)
    op = lb.make_operator(conv, shape)
    x, y = torch.randn(2, *shape), torch.randn(2, *op.out_shape)
    with torch.no_grad():
        plain = conv(x) - (0 if conv.bias is None else conv.bias.view(1, -1, 1, 1))
        assert torch.allclose(op.linear(x), plain, atol=1e-6)
        assert float((op.linear(x) * y).sum()) == pytest.approx(float((x * op.adjoint(y)).sum()), abs=1e-4)
    _check_upper(conv, shape, (torch.rand(3, *shape) > 0.3).float(), (torch.rand(3, *op.out_shape) > 0.3).float())
