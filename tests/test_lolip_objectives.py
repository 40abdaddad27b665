"""lolip objectives: loss values and parameter gradients against direct re-computations of the
docs/method_lolip.md §2 formulas (per-example loops, hand-written log-softmax), both bug modes."""
import math

import pytest
import torch
import torch.nn as nn

import attacks
from lolip.grammar import parse_model
from lolip.objectives import build_objective, llr, trades
from lolip.objectives.adversarial import adversarial_loss
from lolip.objectives.natural import natural_loss

B, C = 5, 3


def tiny_net(seed=0):
    """Smooth (tanh) so that second derivatives, which LLR's paper loss needs, are not zero."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, C))


def batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.6 * torch.rand(B, 1, 2, 6, generator=generator)
    return x, torch.randint(0, C, (B,), generator=generator)


def ce_each(logits, y):
    """Per-example cross-entropy written out: logsumexp(z) - z_y."""
    return logits.exp().sum(1).log() - logits[torch.arange(len(y)), y]


def param_grads(model, loss):
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    return torch.cat([g.flatten() for g in grads])


def objective_grads(model, objective, x, y):
    """(loss, flat parameter gradient) the way the training loop gets them."""
    model.zero_grad(set_to_none=True)
    loss, _ = objective(model, x, y)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


class Spy:
    """Wraps attacks.pgd: records the keyword arguments, the model's mode and the result."""

    def __init__(self, monkeypatch):
        self.real, self.calls = attacks.pgd, []
        monkeypatch.setattr(attacks, 'pgd', self)

    def __call__(self, model, x, y, eps, **options):
        result = self.real(model, x, y, eps, **options)
        self.calls.append(dict(options, eps=eps, training=model.training, result=result))
        return result


def test_natural_is_the_summed_cross_entropy():
    model, (x, y) = tiny_net(), batch()
    loss, grad = objective_grads(model, natural_loss, x, y)
    expected = ce_each(model(x), y).sum()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(grad, param_grads(model, expected), atol=1e-5)


@pytest.mark.parametrize('norm', [math.inf, 2])
def test_adversarial_training_attacks_in_train_mode_and_sums_ce_on_x_adv(norm, monkeypatch):
    spy, model, (x, y) = Spy(monkeypatch), tiny_net(), batch()
    loss, grad = objective_grads(model, lambda m, a, b: adversarial_loss(m, a, b, eps=0.1, norm=norm),
                                 x, y)
    call = spy.calls[0]
    assert call['training'] and call['steps'] == 10 and call['step_size'] == pytest.approx(0.02)
    assert call['random_start'] == 'uniform' and call['order'] == 'project_clip'
    expected = ce_each(model(call['result']), y).sum()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(grad, param_grads(model, expected), atol=1e-5)


def test_advbeta_mixes_clean_and_adversarial_ce(monkeypatch):
    spy, model, (x, y) = Spy(monkeypatch), tiny_net(), batch()
    objective = build_objective(parse_model('advbeta4ce-tor-CNN001'), 0.1, math.inf, True)
    loss, grad = objective_grads(model, objective, x, y)
    x_adv = spy.calls[0]['result']
    assert spy.calls[0]['training']
    expected = ce_each(model(x), y).sum() + 4.0 * ce_each(model(x_adv), y).sum()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(grad, param_grads(model, expected), atol=1e-5)


def manual_kl(clean_logits, adv_logits):
    """sum_i sum_k p_k(x_i) (log p_k(x_i) - log p_k(x'_i)), softmax written out."""
    log_p = clean_logits - clean_logits.exp().sum(1, keepdim=True).log()
    log_q = adv_logits - adv_logits.exp().sum(1, keepdim=True).log()
    return (log_p.exp() * (log_p - log_q)).sum()


@pytest.mark.parametrize('name, beta, steps, summed', [
    ('strades6ce', 6.0, 10, True), ('tradesce', 1.0, 10, False), ('trades3K20ce', 3.0, 20, False),
    ('trades.5ce', 0.5, 10, False)])
def test_trades_loss_and_attack(name, beta, steps, summed, monkeypatch):
    spy, model, (x, y) = Spy(monkeypatch), tiny_net(), batch()
    objective = build_objective(parse_model(f'{name}-tor-CNN001'), 0.05, math.inf, True)
    loss, grad = objective_grads(model, objective, x, y)
    call = spy.calls[0]
    assert not call['training'] and call['steps'] == steps
    assert call['step_size'] == pytest.approx(2 * 0.05 / steps) and call['random_start'] == 'normal'
    probe = x + 0.01
    assert torch.allclose(call['loss'](model, probe, x, y), manual_kl(model(x), model(probe)),
                          atol=1e-5)
    kl = manual_kl(model(x), model(call['result']))
    expected = ce_each(model(x), y).sum() + beta * (kl if summed else kl / B)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(grad, param_grads(model, expected), atol=1e-5)


def test_trades_l2_variant_clips_then_rescales(monkeypatch):
    spy, model, (x, y) = Spy(monkeypatch), tiny_net(), batch()
    trades.trades_loss(model, x, y, eps=0.5, norm=2, beta=1.0, steps=10, summed=False)
    call = spy.calls[0]
    assert call['norm'] == 2 and call['order'] == 'clip_project'
    assert (call['result'] - x).flatten(1).norm(dim=1).max() <= 0.5 * (1 + 1e-5)


def fixed_delta(x, eps=0.05):
    generator = torch.Generator().manual_seed(7)
    return eps * (2 * torch.rand(x.shape, generator=generator) - 1)


def paper_llr(model, x, delta, y, lam, mu, summed):
    """The paper's LLR loss, one example at a time (G_i by its own backward pass)."""
    total, gaps, dots = 0.0, 0.0, []
    for i in range(len(y)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        li = ce_each(model(xi), y[i:i + 1]).sum()
        gi, = torch.autograd.grad(li, xi, create_graph=True)
        dot = (delta[i:i + 1] * gi).sum()
        shifted = ce_each(model(xi + delta[i:i + 1]), y[i:i + 1]).sum()
        total = total + li
        gaps = gaps + (shifted - li - dot).abs()
        dots.append(dot.abs())
    tangent = sum(dots) if summed else sum(dots) / len(dots)
    return total + lam * gaps + mu * tangent


@pytest.mark.parametrize('summed', [False, True])
def test_llr_paper_loss_and_gradient(summed):
    model, (x, y) = tiny_net(), batch()
    delta = fixed_delta(x)
    objective = lambda m, a, b: llr.llr_loss_at(m, a, delta, b, lam=4.0, mu=3.0, summed=summed,
                                                as_published=False)
    loss, grad = objective_grads(model, objective, x, y)
    expected = paper_llr(model, x, delta, y, 4.0, 3.0, summed)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(grad, param_grads(model, expected), atol=1e-5)


def test_llr_as_published_is_ce_plus_lambda_ce_of_the_shifted_input():
    """Zeroed gradient and no -l(x): CE(x) + lambda CE(x + delta); it differs from the paper's."""
    model, (x, y) = tiny_net(), batch()
    delta = fixed_delta(x)
    objective = lambda m, a, b: llr.llr_loss_at(m, a, delta, b, lam=6.0, mu=5.0, summed=False,
                                                as_published=True)
    loss, grad = objective_grads(model, objective, x, y)
    expected = ce_each(model(x), y).sum() + 6.0 * ce_each(model(x + delta), y).sum()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(grad, param_grads(model, expected), atol=1e-5)
    paper = param_grads(model, paper_llr(model, x, delta, y, 6.0, 5.0, False))
    assert (grad - paper).abs().max() > 1e-2


@pytest.mark.parametrize('norm, as_published', [(math.inf, True), (2, True), (math.inf, False)])
def test_llr_search_stays_in_the_ball_and_the_box(norm, as_published):
    model, (x, y) = tiny_net(), batch()
    x = torch.cat([x, torch.zeros(1, 1, 2, 6)])  # an image on the box's corner
    y = torch.cat([y, torch.zeros(1, dtype=torch.long)])
    clean, grad = llr.input_gradient(model, x, y, create_graph=False)
    delta = llr.llr_search(model, x, y, 0.1, norm, clean.detach(), grad, as_published)
    size = delta.flatten(1).norm(dim=1) if norm == 2 else delta.flatten(1).abs().amax(1)
    assert size.max() <= 0.1 * (1 + 1e-5)
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    start_gap = llr.linearity_gap(model, x, 0 * delta, y, clean, grad, as_published).sum()
    assert llr.linearity_gap(model, x, delta, y, clean, grad, as_published).sum() > start_gap


def test_llr_grammar_picks_lambda_mu_and_summing():
    spec = parse_model('sllr36ce-tor-CNN001')
    assert spec.objective == 'llr' and spec.params == dict(lam=3.0, mu=6.0, summed=True)
    assert parse_model('llrce-tor-CNN001').params == dict(lam=4.0, mu=3.0, summed=False)


def paper_tulip(model, x, y, lam, h):
    """CE + lambda/2 sum_i ((l_i(x + h v_i) - l_i(x)) / h)^2 with v_i from each example's own
    gradient (a constant)."""
    losses = ce_each(model(x), y)
    directions = []
    for i in range(len(y)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        gi, = torch.autograd.grad(ce_each(model(xi), y[i:i + 1]).sum(), xi)
        directions.append(gi / gi.norm())
    v = torch.cat(directions).detach()
    shifted = ce_each(model(x + h * v), y)
    return losses.sum() + lam / 2 * (((shifted - losses) / h) ** 2).sum(), losses.sum()


@pytest.mark.parametrize('name, lam, step', [('tulipce', 1.0, 1.0), ('tulipem1ssem2ce', 0.1, 0.01)])
def test_tulip_both_modes(name, lam, step):
    """Same loss value; as published the parameters get exactly one extra CE gradient."""
    spec = parse_model(f'{name}-tor-CNN001')
    assert spec.params == dict(lam=lam, step=step)
    model, (x, y) = tiny_net(), batch()
    expected, ce = paper_tulip(model, x, y, lam, step)
    paper_grad, ce_grad = param_grads(model, expected), param_grads(model, ce)
    for as_published in (False, True):
        loss, grad = objective_grads(model, build_objective(spec, 0.1, math.inf, as_published), x, y)
        assert torch.allclose(loss, expected, atol=1e-5)
        wanted = paper_grad + ce_grad if as_published else paper_grad
        assert torch.allclose(grad, wanted, atol=1e-5)
    assert (ce_grad.abs().max()) > 1e-2


def test_every_objective_leaves_the_model_in_train_mode():
    x, y = batch()
    for name in ('ce', 'advce', 'advbeta.5ce', 'strades3ce', 'sllrce', 'tulipce'):
        model = tiny_net().eval()
        build_objective(parse_model(f'{name}-tor-CNN001'), 0.1, math.inf, True)(model, x, y)
        assert model.training, name
