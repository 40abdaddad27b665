"""The refined bound (docs/method.md §7): sound on small networks of every activation, never above
the paper's local bound, each refinement doing something, and trainable.

Norms are exact here (``EXACT``: the float64 SVD of every masked matrix, an upper bound with no
failure probability), so every comparison is one of the method, not of an estimate.
"""
import pytest
import torch
import torch.nn as nn

import local_bound as lb
from helpers import (DT, attack_margin, layer_outputs, per_neuron_attack_points, random_thresholds, sample_ball,
                     small_conv_net, small_mlp, _seed)
from settings import CERTIFIED, TRAINING

EXACT = CERTIFIED.replace(exact_below=10**7)
REFINED = EXACT.replace(bound='refined')

pytestmark = pytest.mark.usefixtures('one_thread')


def net(name, seed=50):
    arch, kind = name.split('-')
    if arch == 'conv':
        return small_conv_net(kind, seed=seed), (2, 7, 7)
    return random_thresholds(small_mlp(kind, seed=seed), 0.05, 0.3), (10,)


def inputs(shape, n=3, seed=51):
    _seed(seed)
    return 0.2 + 0.6 * torch.rand(n, *shape, dtype=DT)


def boxes(model, x, eps, settings):
    """[(lower, upper)] after every layer but the last, from passes over the model cut after that
    layer (a pass is causal: the cut model's last box is the whole model's box there)."""
    layers, out = list(model)[:-1], []
    for k in range(len(layers)):
        width = layer_outputs(model, x)[k][0].numel()
        cut = nn.Sequential(*layers[:k + 1], nn.Flatten(), nn.Linear(width, 2).to(DT))
        state = lb.propagate(cut, x, eps, settings)
        out.append((state.lower.detach().reshape(x.size(0), -1), state.upper.detach().reshape(x.size(0), -1)))
    return out


NETS = ['conv-relux', 'conv-relu', 'conv-maxmin', 'mlp-relux', 'mlp-relu', 'mlp-maxmin']


@pytest.mark.parametrize('name', NETS)
def test_refined_boxes_hold_every_sampled_and_attacked_point(name):
    """Dense samples of the ball (a third on the sphere) and per-neuron PGD towards each neuron's
    max and min at every layer stay inside every refined box, which is strictly smaller than the
    paper's somewhere (else the test would prove nothing)."""
    model, shape = net(name)
    x, eps = inputs(shape), 0.25
    refined, local = boxes(model, x, eps, REFINED), boxes(model, x, eps, EXACT)
    gen = torch.Generator().manual_seed(52)
    layers = list(model)[:-1]
    for b in range(x.size(0)):
        attacked = [per_neuron_attack_points(model, x[b], eps, k, gen, steps=15, starts=1)
                    for k, layer in enumerate(layers) if type(layer) in (nn.Conv2d, nn.Linear)]
        points = torch.cat([sample_ball(x[b:b + 1], eps, 2000, gen)[0], *attacked, x[b:b + 1]])
        for k, z in enumerate(layer_outputs(model, points)):
            lower, upper = refined[k][0][b], refined[k][1][b]
            z, slack = z.reshape(len(points), -1), 1e-9 * (1 + float(upper.abs().max()))
            assert (z >= lower - slack).all() and (z <= upper + slack).all(), f'{name}: layer {k}, input {b}'
    tighter = sum(int(((r[1] - r[0]) < (p[1] - p[0]) - 1e-12).sum()) for r, p in zip(refined, local))
    wider = sum(int(((r[1] - r[0]) > (p[1] - p[0]) + 1e-12).sum()) for r, p in zip(refined, local))
    assert tighter > 0 and wider == 0, f'{name}: {tighter} tighter, {wider} wider neurons than the paper'


@pytest.mark.parametrize('kind', ['relux', 'relu', 'maxmin'])
def test_refined_worst_case_logits_are_never_beaten(kind):
    model = small_conv_net(kind, seed=53)
    x, eps = inputs((2, 7, 7), seed=54), 0.2
    with torch.no_grad():
        y = model(x).argmax(1)
    worst = lb.bound_outputs(model, x, y, eps, REFINED).worst.detach()
    bound = worst - worst.gather(1, y[:, None])
    gen = torch.Generator().manual_seed(55)
    samples = sample_ball(x, eps, 2000, gen)
    for b in range(x.size(0)):
        with torch.no_grad():
            z = model(samples[b])
        assert (z - z[:, y[b]:y[b] + 1] <= bound[b] + 1e-7).all(), f'sampled margin above the bound ({b})'
        for j in range(z.size(1)):
            if j != int(y[b]):
                assert attack_margin(model, x[b], int(y[b]), j, eps, gen) <= float(bound[b, j]) + 1e-7


def jacobian_norms(model, points):
    """Float64 spectral norm of the penultimate map's Jacobian at every point (autograd, SVD)."""
    body = nn.Sequential(*list(model)[:-1])
    norms = []
    for p in points:
        jac = torch.autograd.functional.jacobian(lambda t: body(t[None]).flatten(), p)
        norms.append(float(torch.linalg.matrix_norm(jac.reshape(jac.size(0), -1), ord=2)))
    return torch.tensor(norms, dtype=DT)


@pytest.mark.parametrize('name', ['conv-relux', 'conv-maxmin', 'mlp-relu', 'mlp-relux'])
def test_refined_bound_is_between_the_sampled_jacobian_and_the_local_bound(name):
    """sup of ||J_h|| over sampled ball points <= refined <= the paper's local bound, per example,
    and the refined bound is below the local one on some example."""
    model, shape = net(name, seed=56)
    x, eps = inputs(shape, n=4, seed=57), 0.4 if name.startswith('mlp') else 0.2
    refined = lb.local_lipschitz(model, x, eps, REFINED)
    local = lb.local_lipschitz(model, x, eps, EXACT)
    assert (refined <= local * (1 + 1e-12)).all(), f'{name}: refined above local'
    assert (refined < local * (1 - 1e-6)).any(), f'{name}: the refined bound changed nothing'
    gen = torch.Generator().manual_seed(58)
    points = sample_ball(x, eps, 60, gen)
    for b in range(x.size(0)):
        sampled = jacobian_norms(model, torch.cat([points[b], x[b:b + 1]])).max()
        assert sampled <= refined[b] * (1 + 1e-9), f'{name}, input {b}: Jacobian {sampled} > bound {refined[b]}'


def test_each_refinement_changes_the_bound_and_both_are_tightest():
    """'rows' alone and 'radius' alone each lower the bound on some example of a network where
    both matter, both together are at most either alone, and none is above the paper's."""
    model, shape = net('conv-relux', seed=59)
    x, eps = inputs(shape, n=6, seed=60), 0.1
    local = lb.local_lipschitz(model, x, eps, EXACT)
    alone = {r: lb.local_lipschitz(model, x, eps, REFINED.replace(refinements=(r,))) for r in ('rows', 'radius')}
    both = lb.local_lipschitz(model, x, eps, REFINED)
    for r, bound in alone.items():
        assert (bound <= local * (1 + 1e-12)).all(), r
        assert (bound < local * (1 - 1e-6)).any(), f"refinement '{r}' alone changed nothing"
        assert (both <= bound * (1 + 1e-12)).all(), f"both refinements above '{r}' alone"
    assert (both < torch.minimum(alone['rows'], alone['radius']) * (1 - 1e-6)).any()


def test_masked_row_norms_equal_explicit_rows():
    """Refinement 1's ||W_j D_in|| for a conv (one convolution of the mask with W**2) and a Linear
    layer, against the explicit masked matrix."""
    from helpers import explicit_matrix
    _seed(61)
    conv, shape = nn.Conv2d(2, 3, 3, 2, 1).to(DT), (2, 7, 7)
    mask = (torch.rand(4, *shape) < 0.6).to(DT)
    op = lb.make_operator(conv, shape)
    rows = op.masked_row_norms(mask).reshape(4, -1)
    matrix = explicit_matrix(conv, shape)
    for b in range(4):
        torch.testing.assert_close(rows[b], (matrix * mask[b].reshape(1, -1)).norm(dim=1), rtol=1e-12, atol=1e-15)
    linear = nn.Linear(9, 5).to(DT)
    flat = (torch.rand(4, 9) < 0.5).to(DT)
    rows = lb.make_operator(linear, (9,)).masked_row_norms(flat)
    torch.testing.assert_close(rows, (linear.weight[None] * flat[:, None]).norm(dim=2), rtol=1e-12, atol=1e-15)


def test_guaranteed_refined_certifies_what_the_local_bound_does_and_more():
    """With the default guaranteed (probabilistic) norms: every example the paper's bound certifies
    is certified by the refined one, on a network and eps where the refined one certifies more."""
    model, shape = net('mlp-relu', seed=62)
    x = inputs(shape, n=64, seed=63)
    with torch.no_grad():
        y = model(x).argmax(1)
    counts = []
    for eps in (0.25, 0.3, 0.35):
        local = lb.certify(model.float(), x.float(), y, eps, CERTIFIED)
        refined = lb.certify(model.float(), x.float(), y, eps, CERTIFIED.replace(bound='refined'))
        assert not (local & ~refined).any(), f'eps {eps}: a local certificate lost'
        counts.append((int(local.sum()), int(refined.sum())))
    assert any(r > l for l, r in counts), counts


@pytest.mark.parametrize('kind', ['relux', 'maxmin'])
def test_refined_training_pass_has_finite_gradients_through_the_radius(kind):
    """Training settings (warm power iteration from a store): the radius depends on the per-sample
    norms, and the loss has finite gradients for every parameter, thresholds included."""
    model = small_conv_net(kind, seed=64).float()
    x = inputs((2, 7, 7), n=8, seed=65).float()
    y = torch.arange(8) % 4
    store = lb.SingularVectorStore(model, (2, 7, 7), 8, seed=0)
    settings = TRAINING.replace(bound='refined', sniter=2)
    worst = lb.worst_case_logits(model, x, y, 0.3, settings, store=store, index=torch.arange(8))
    torch.nn.functional.cross_entropy(worst, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    record = lb.propagate(model, x, 0.3, settings).records[0]
    assert record.sigma is not None and record.sigma.requires_grad      # the radius follows it


@pytest.mark.parametrize('bound', ['local', 'refined'])
def test_a_nearly_dead_network_settles_at_the_first_check(bound, monkeypatch):
    """Masked norms near 0 never come within a relative tolerance of their estimates; a product a
    millionth of the global one is settled anyway (else every check to the last one runs)."""
    model = small_mlp('relu', seed=66).float()
    with torch.no_grad():
        model[1].bias.fill_(-50.0)              # every first-layer ReLU is dead on the ball
        model[1].bias[0] = 0.0                  # but one, barely moving
        model[1].weight[0].mul_(1e-7)
    x = inputs((10,), n=4, seed=67).float()
    settings = CERTIFIED.replace(bound=bound, sniter=100000, exact_below=0)
    calls = []
    original = lb.guaranteed.KrylovRun.advance
    monkeypatch.setattr(lb.guaranteed.KrylovRun, 'advance',
                        lambda self, steps: (calls.append(steps), original(self, steps))[1])
    product = lb.local_lipschitz(model, x, 0.1, settings)
    assert (product >= 0).all() and (product < 1e-6 * lb.global_lipschitz(model, sniter=500, input_shape=(10,))).all()
    assert sum(calls) <= 3 * 32, f'{sum(calls)} Lanczos steps for a settled product'
