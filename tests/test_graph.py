"""Your own network (graph.py): plain PyTorch modules with BatchNorm, pooling, Dropout and linear
residual blocks through the public API, checked against independent computations (the user's
own forward, float64 Jacobians by autograd, exact rationals, attacks), and one-line refusals."""
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import local_bound as lb
import models
from helpers import attack_margin, sample_ball
from settings import CERTIFIED, LANCZOS

DT = torch.float64


class SmallResNet(nn.Module):
    """Every supported rewrite at once: conv+BN, a linear residual, BN after an activation,
    AvgPool2d, AdaptiveAvgPool2d, Dropout, Identity, torch.flatten, Linear+BN1d."""

    def __init__(self, pool='avg'):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.res = nn.Conv2d(4, 4, 3, padding=1)
        self.post = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2) if pool == 'avg' else nn.AdaptiveAvgPool2d(2)
        self.drop, self.skip = nn.Dropout(0.2), nn.Identity()
        self.fc1, self.bn1, self.fc2 = nn.Linear(16, 12), nn.BatchNorm1d(12), nn.Linear(12, 3)

    def features(self, x):
        """Everything but the last Linear (written out here, independently of graph.py)."""
        x = F.relu(self.bn(self.stem(x)))
        x = torch.relu(self.res(x) + x)
        x = self.pool(self.post(x))
        x = self.skip(self.drop(torch.flatten(x, 1)))
        return F.relu(self.bn1(self.fc1(x)))

    def forward(self, x):
        return self.fc2(self.features(x))


class ViewNet(nn.Module):
    """``x.view(x.size(0), -1)`` and the residual written ``x + conv(x)``."""

    def __init__(self):
        super().__init__()
        self.conv, self.res, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.Linear(32, 3)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = F.relu(x + self.res(x))
        return self.fc(x.view(x.size(0), -1))


class BasicBlock(nn.Module):
    """torchvision's ResNet block: conv-BN-ReLU-conv-BN plus the input (or a strided 1x1 conv-BN)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out += identity
        return F.relu(out)


class TinyResNet(nn.Module):
    """A torchvision-style ResNet: stem conv-BN-ReLU, two blocks (one downsampling), global
    average pooling, the logits."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 3, 3, 1, 1, bias=False), nn.BatchNorm2d(3)
        self.layer1 = nn.Sequential(BasicBlock(3, 3), BasicBlock(3, 4, 2))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Linear(4, 3)

    def features(self, x):
        x = self.layer1(F.relu(self.bn1(self.conv1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


def randomised(net, seed=0):
    """``net`` in float64 eval mode with BatchNorm statistics and affine parameters drawn away from
    the identity (a fresh BN folds to almost nothing)."""
    torch.manual_seed(seed)
    net = net.to(DT)
    with torch.no_grad():
        for bn in (m for m in net.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.3, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize('make', [SmallResNet, lambda: SmallResNet('adaptive'), ViewNet, TinyResNet])
def test_the_chain_computes_the_users_forward(make):
    net = randomised(make())
    x = torch.rand(6, 1, 4, 4, dtype=DT)
    chain = lb.boundable(net, x)
    assert isinstance(chain, nn.Sequential) and type(chain[-1]) is nn.Linear
    assert torch.allclose(chain(x), net(x), rtol=0, atol=1e-12)


def test_a_chain_of_the_zoo_is_returned_as_it_is():
    model = models.select_model('mnist', 'liresnet')
    assert lb.boundable(model, torch.rand(2, 1, 28, 28)) is model


def penultimate_jacobian_norm(net, z):
    """||d features / d x|| at one point, by autograd and a float64 SVD."""
    jac = torch.autograd.functional.jacobian(lambda v: net.features(v[None])[0], z)
    return float(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), ord=2))


@pytest.mark.parametrize('eps', [0.02, 0.3])
@pytest.mark.parametrize('make', [SmallResNet, TinyResNet])
def test_the_guaranteed_local_bound_is_above_every_jacobian_in_the_ball(eps, make):
    """The product of the pass (guaranteed norms of the folded maps, masks included; a residual
    block's branches added) is at least the Jacobian norm of the user's own feature map at dense
    samples of the ball, and at most the product of the global norms."""
    net = randomised(make(), seed=1)
    x = torch.rand(3, 1, 4, 4, dtype=DT)
    local = lb.local_lipschitz(net, x, eps)
    gen = torch.Generator().manual_seed(0)
    for i in range(len(x)):
        points = sample_ball(x[i:i + 1], eps, 40, gen)[0]
        sampled = max(penultimate_jacobian_norm(net, p) for p in points)
        assert sampled <= float(local[i]) * (1 + 1e-9), (i, sampled, float(local[i]))
    assert (local <= lb.global_lipschitz(net, input_shape=(1, 4, 4), precise=True) * (1 + 1e-6)).all()


def test_the_masked_norm_of_a_linear_residual_is_that_of_identity_plus_conv():
    """One block's norm against the float64 SVD of the explicit I + W (no masks at a large eps
    where every neuron varies is the plain norm)."""
    conv = nn.Conv2d(2, 2, 3, padding=1).to(DT)
    block = models.LinearResidual(conv)
    basis = torch.eye(2 * 5 * 5, dtype=DT).view(-1, 2, 5, 5)
    explicit = (basis + F.conv2d(basis, conv.weight, padding=1)).flatten(1).t()
    expected = float(torch.linalg.matrix_norm(explicit, ord=2))
    net = nn.Sequential(block, nn.ReLU(), models.Flatten(), nn.Linear(50, 2)).to(DT)
    norms = lb.layer_norms(net, torch.rand(1, 2, 5, 5, dtype=DT), 1e3, CERTIFIED)
    assert expected <= float(norms[0]) <= expected * (1 + 1e-6)


@pytest.mark.parametrize('make', [SmallResNet, TinyResNet])
def test_certificates_survive_attacks_on_the_users_network(make):
    net = randomised(make(), seed=2)
    x = torch.rand(8, 1, 4, 4, dtype=DT)
    y = net(x).argmax(1)
    gen = torch.Generator().manual_seed(1)
    seen = 0
    for eps in (0.01, 0.05, 0.2):
        certified = lb.certify(net, x, y, eps)
        for i in torch.nonzero(certified).flatten().tolist():
            seen += 1
            for j in range(3):
                if j != int(y[i]):
                    assert attack_margin(net, x[i], int(y[i]), j, eps, gen, steps=20, starts=3) < 0
    assert seen >= 4, 'choose radii where some examples certify'


def test_the_rigorous_pass_encloses_the_exact_fold_of_a_cancelling_batchnorm():
    """Linear + BatchNorm1d whose shift ``a (b - mean)`` of size 1e6 and ``beta`` cancel to 1e-3:
    the folded bias is rounded by about 1e-10, far more than its own size allows for. The float64
    pass's centre +/- its error bound still encloses the exact rational value of BN(Wx + b)."""
    linear, bn = nn.Linear(3, 2).to(DT), nn.BatchNorm1d(2).to(DT).eval()
    with torch.no_grad():
        linear.bias.copy_(torch.tensor([1e6 + 0.1, -3e5], dtype=DT))
        bn.running_mean.copy_(torch.tensor([0.1, 0.2], dtype=DT))
        bn.running_var.copy_(torch.tensor([0.7, 3.1], dtype=DT))
        bn.weight.copy_(torch.tensor([1.3, 0.9], dtype=DT))
        shift = (linear.bias - bn.running_mean) * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bn.bias.copy_(-shift + torch.tensor([1e-3, 2e-3], dtype=DT))
    net = nn.Sequential(linear, bn, nn.ReLU(), nn.Linear(2, 2)).to(DT)
    x = torch.full((1, 3), 0.25, dtype=DT)
    state = lb.propagate(net, x, 1e-3, CERTIFIED.replace(seed=0))
    for j in range(2):
        exact = max(exact_fold(linear, bn, x[0], j), Fraction(0))     # the ReLU after the fold
        centre, err = Fraction(float(state.centre[0, j])), Fraction(float(state.centre_err[0, j]))
        assert abs(centre - exact) <= err, (j, float(centre - exact), float(err))


def exact_fold(linear, bn, x, j):
    """``bn(linear(x))_j`` in exact rationals from the float64 values (sqrt bracketed by bisection)."""
    f = lambda t: Fraction(float(t.detach()))  # noqa: E731
    pre = sum(f(linear.weight[j, i]) * f(x[i]) for i in range(x.numel())) + f(linear.bias[j])
    var = f(bn.running_var[j]) + Fraction(bn.eps)
    low, high = Fraction(0), var + 1
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if mid * mid < var else (low, mid)
    value = (pre - f(bn.running_mean[j])) * f(bn.weight[j]) / low + f(bn.bias[j])
    assert abs(value - (pre - f(bn.running_mean[j])) * f(bn.weight[j]) / high - f(bn.bias[j])) < Fraction(1, 10**30)
    return value


def test_estimates_and_training_settings_take_the_users_network():
    net = randomised(SmallResNet(), seed=3)
    x, y = torch.rand(4, 1, 4, 4, dtype=DT), torch.tensor([0, 1, 2, 0])
    assert lb.certify(net, x, y, 0.01, LANCZOS).shape == (4,)
    assert lb.local_lipschitz(net, x, 0.05, LANCZOS).shape == (4,)


class MaxPoolNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1), nn.Linear(64, 2)

    def forward(self, x):
        return self.fc(torch.flatten(torch.cat([F.relu(self.conv1(x)), F.relu(self.conv2(x))], 1), 1))


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1)) * 2))


@pytest.mark.parametrize('net, message', [
    (MaxPoolNet(), r"layer pool \(MaxPool2d\): no bound rule"),
    (ConcatNet(), r"node 'cat' \(cat\): takes 2 tensors; the bound pass follows one chain"),
    (ScaledNet(), r"node 'mul' \(mul\): not supported by the bound pass"),
    (SmallResNet().train(), r"layer bn \(BatchNorm2d\) is in training mode: call model.eval\(\)"),
])
def test_what_the_pass_does_not_model_is_one_line_naming_the_node(net, message):
    with pytest.raises(lb.BoundError, match=message) as caught:
        lb.certify(net.float(), torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), 0.1)
    assert '\n' not in str(caught.value)


class Doubling(nn.Dropout):
    """A Dropout subclass whose forward doubles: not a Dropout to drop."""

    def forward(self, x):
        return 2 * x


class TripledSequential(nn.Sequential):
    """A Sequential subclass whose forward triples the layers' output: not a plain chain."""

    def forward(self, x):
        return super().forward(x) * 3


@pytest.mark.parametrize('net, message', [
    (nn.Sequential(nn.Linear(16, 8), nn.ReLU(), Doubling(), nn.Linear(8, 2)), r'layer 2 \(Doubling\): no bound rule'),
    (TripledSequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2)), r"node 'mul' \(mul\): not supported"),
    (nn.Sequential(models.Residual(TripledSequential(nn.Linear(16, 16))), nn.Linear(16, 2)),
     r'layer 0\.f \(TripledSequential\): no bound rule for this layer type \(its forward calls mul'),
])
def test_subclasses_with_their_own_forward_are_never_taken_for_their_base(net, message):
    """A subclass of Dropout or Sequential computes what its forward says; the pass never bounds
    it as the base class (which would drop the doubling, or walk the layers without the tripling)."""
    x = torch.rand(2, 16) if not isinstance(net[0], nn.Flatten) else torch.rand(2, 1, 4, 4)
    with pytest.raises(lb.BoundError, match=message):
        lb.certify(net.eval(), x, torch.tensor([0, 1]), 0.1)


class InPlaceAlias(nn.Module):
    """``h + relu_(h)``: the in-place ReLU changes ``h`` too, so the forward is ``2 relu(h)``, while
    the trace records ``h + relu(h)``."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace=True), nn.Linear(32, 2)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(torch.flatten(h + self.relu(h), 1))


def test_an_in_place_operation_that_aliases_is_refused():
    with pytest.raises(lb.BoundError, match='the traced graph does not compute what its forward computes'):
        lb.certify(InPlaceAlias().eval(), torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), 0.1)


def test_an_in_place_activation_inside_a_residual_block_changes_nothing_else():
    """Residual(f) with an in-place ReLU first in f: the block computes x + conv(relu(x)), what the
    pass bounds (the ReLU works on a copy), and its certificates survive attacks."""
    torch.manual_seed(7)
    f = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(2, 2, 3, padding=1))
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), models.Residual(f), nn.ReLU(), models.Flatten(),
                        nn.Linear(32, 3)).to(DT).eval()
    x = torch.rand(6, 1, 4, 4, dtype=DT) - 0.5
    h = net[0](x)
    assert torch.equal(net[1](h.clone()), h + f[1](F.relu(h)))
    y = net(x).argmax(1)
    gen = torch.Generator().manual_seed(2)
    for eps in (0.01, 0.1):
        for i in torch.nonzero(lb.certify(net, x, y, eps)).flatten().tolist():
            for j in set(range(3)) - {int(y[i])}:
                assert attack_margin(net, x[i], int(y[i]), j, eps, gen, steps=20, starts=3) < 0


def test_a_hook_inside_the_users_network_is_refused():
    net = randomised(SmallResNet()).float()
    net.bn.register_forward_hook(lambda module, inputs, output: output * 0)
    with pytest.raises(lb.BoundError, match=r'layer bn \(BatchNorm2d\) has a forward hook'):
        lb.certify(net, torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), 0.1)


def test_a_wrong_input_shape_is_one_line():
    with pytest.raises(lb.BoundError, match=r'an input of shape \(3, 4, 4\) does not fit SmallResNet'):
        lb.certify(randomised(SmallResNet()).float(), torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), 0.1)


def test_the_refined_bound_refuses_residual_blocks_in_one_line():
    with pytest.raises(lb.BoundError, match='the refined bound follows plain chains'):
        lb.certify(randomised(TinyResNet()), torch.rand(2, 1, 4, 4, dtype=DT), torch.tensor([0, 1]), 0.1,
                   CERTIFIED.replace(bound='refined'))


def test_a_residual_block_of_the_zoo_is_composed_as_a_sum():
    """Residual(f) in a Sequential: the chain is kept as it is, the local bound at a large eps (every
    neuron varying) equals 1 + ||J_f|| computed from the float64 SVD of f's explicit matrix."""
    torch.manual_seed(4)
    f = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6)).to(DT)
    net = nn.Sequential(models.Residual(f), nn.ReLU(), nn.Linear(6, 2)).to(DT)
    x = torch.rand(1, 6, dtype=DT)
    assert lb.boundable(net, x) is net
    expected = 1 + float(torch.linalg.matrix_norm(f[0].weight, ord=2) * torch.linalg.matrix_norm(f[2].weight, ord=2))
    local = float(lb.local_lipschitz(net, x, 1e3)[0])
    assert expected <= local <= expected * (1 + 1e-6)


def test_a_linear_residual_must_keep_the_size():
    with pytest.raises(ValueError, match='size-keeping Conv2d'):
        models.LinearResidual(nn.Conv2d(2, 3, 3, padding=1))
    with pytest.raises(ValueError, match='size-keeping Conv2d'):
        models.LinearResidual(nn.Conv2d(2, 2, 3, padding=1, stride=2))


class ResidualMLP(nn.Module):
    """Linear-ReLU, a residual block with an activation inside, ReLU, the logits."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.fc2, self.fc3 = nn.Linear(16, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def features(self, x):
        x = F.relu(self.fc0(torch.flatten(x, 1)))
        return F.relu(x + self.fc2(F.relu(self.fc1(x))))

    def forward(self, x):
        return self.fc3(self.features(x))


def extreme_features(net, x, eps, steps=30):
    """Per penultimate coordinate, the smallest and largest value PGD finds in the ball (plus samples)."""
    gen = torch.Generator().manual_seed(5)
    points = sample_ball(x, eps, 64, gen)[0]
    low, high = net.features(points).min(0).values, net.features(points).max(0).values
    for k in range(low.numel()):
        for sign in (-1, 1):
            delta = torch.zeros_like(x).requires_grad_(True)
            for _ in range(steps):
                value = sign * net.features(x + delta)[0, k]
                grad, = torch.autograd.grad(value, delta)
                with torch.no_grad():
                    delta += eps / 6 * grad / grad.norm().clamp_min(1e-30)
                    delta *= torch.clamp(eps / delta.norm().clamp_min(1e-30), max=1.0)
            reached = float(net.features(x + delta.detach())[0, k])
            low[k], high[k] = min(float(low[k]), reached), max(float(high[k]), reached)
    return low.detach(), high.detach()


@pytest.mark.parametrize('make', [ResidualMLP, TinyResNet])
@pytest.mark.parametrize('eps', [0.05, 0.5])
def test_the_boxes_after_a_residual_block_contain_the_attacked_features(make, eps):
    net = randomised(make(), seed=6)
    x = torch.rand(1, 1, 4, 4, dtype=DT)
    for settings in (CERTIFIED.replace(seed=0), LANCZOS.replace(seed=0)):
        state = lb.propagate(net, x, eps, settings)
        low, high = extreme_features(net, x, eps)
        assert (state.lower[0].double() <= low + 1e-12).all() and (high <= state.upper[0].double() + 1e-12).all()


def test_a_batchnorm_with_nan_statistics_is_one_line():
    net = randomised(TinyResNet()).float()
    with torch.no_grad():
        net.layer1[0].bn2.running_var[1] = float('nan')
    with pytest.raises(lb.BoundError, match=r'layer 2 \(Residual\): statistic f\.2\.bn\.running_var holds NaN'):
        lb.certify(net, torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), 0.1)


def test_layers_inside_residual_blocks_have_keys_in_pass_order():
    """The zoo resnet's activations and affine layers inside blocks are keyed 'block.branch.layer'
    (metrics columns, stores), and every one gets a rule check."""
    model = models.select_model('mnist', 'resnet')
    assert lb.activation_layers(model) == [1, '2.1.1', 3, '4.1.1', 5, 7, 10]
    assert list(lb.affine_layers(model, (1, 28, 28))) == [0, '2.1.0', '2.1.2', '4.1.0', '4.1.2', 6, 9]
