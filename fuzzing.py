"""A randomised-architecture fuzz of the certifier (``tests/test_fuzz.py``, ``bench/fuzz.py``).

``random_network(seed)`` builds a small ``nn.Sequential`` from every layer type the bound pass
models (Linear, Conv2d with random kernel, stride, padding, groups and bias, both Flattens, ReLU,
ReLUθ, clipped MaxMin) in random orders, with motifs the fixed architectures never show: a MaxMin
directly followed by ReLU or ReLUθ, two activations in a row, two affine layers in a row, an
activation first. ``check_network`` then certifies sampled inputs (labels: the model's own
predictions) at several eps with the guaranteed default and the refined bound, and checks every
certificate and every per-sample norm against ``reference.py`` (float64, independent):

* *broken*: float64 PGD on the logit gap or a sampled point of the ball or sphere flips it;
* *unconfirmed*: the reference (never looser than a correct pass) does not certify it;
* *norm below reference*: a norm of ``local_bound.layer_norms`` is below the SVD of the explicit
  matrix masked by the reference's own masks (taken with a small tolerance, so that only masks a
  correct pass could not undercut count);
* *reference broken*: an attack flips a certificate of the reference itself (a bug of this fuzz).
"""
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import local_bound
import reference
from models import ClampGroupSort, Flatten, ReLU_x
from settings import CERTIFIED

SETTINGS = {'default': CERTIFIED, 'refined': CERTIFIED.replace(bound='refined')}
# The refined bound takes its norms during the pass at a fixed number of Lanczos steps: fewer steps
# give larger upper bounds (still bounds), and the fuzz's many small convs run far faster so.
NORM_SETTINGS = {'default': CERTIFIED, 'refined': CERTIFIED.replace(bound='refined', sniter=256)}
NORM_TOLERANCE = 1e-5      # the reference's constant-interval tolerance for the norm comparison
NORM_RTOL = 1e-6           # a pass norm may sit this far (relative) below the reference's
MOTIFS = (('maxmin', 'relu'), ('maxmin', 'relux'), ('act', 'act'), ('affine', 'affine'))


# ----------------------------------------------------------------------------- random networks

@dataclass
class Network:
    """A random model (float32) with its input shape, a readable architecture and the motifs it holds."""
    seed: int
    model: nn.Sequential
    input_shape: tuple
    layers: list
    motifs: set

    def describe(self):
        return f'seed {self.seed}: input {list(self.input_shape)} ' + ' '.join(self.layers)


class _Builder:
    """Appends layers to a growing model, keeping the current shape and a readable name per layer."""

    def __init__(self, rng, shape):
        self.rng, self.shape, self.modules, self.names = rng, tuple(shape), [], []

    @property
    def image(self):
        return len(self.shape) == 3

    def add(self, module, name):
        self.modules.append(module)
        self.names.append(name)
        with torch.no_grad():
            self.shape = tuple(module(torch.zeros(1, *self.shape)).shape[1:])

    def affine(self):
        if self.image:
            self.conv()
        else:
            out = self.rng.randrange(2, 9) * 2
            self.add(_scaled(nn.Linear(self.shape[0], out, bias=self.rng.random() < 0.8), self.rng),
                     f'Linear({self.shape[0]},{out})')

    def conv(self):
        rng, (c, h, w) = self.rng, self.shape
        out = rng.choice([2, 4, 6, 8])
        groups = rng.choice([g for g in range(1, min(c, out) + 1) if c % g == 0 and out % g == 0])
        padding = rng.choice([0, 1])
        kernel = rng.choice([k for k in (1, 2, 3) if k <= min(h, w) + 2 * padding])
        stride = rng.choice([1, 2])
        bias = rng.random() < 0.8
        self.add(_scaled(nn.Conv2d(c, out, kernel, stride, padding, groups=groups, bias=bias), rng),
                 f'Conv({c},{out},k{kernel},s{stride},p{padding},g{groups}{"" if bias else ",nobias"})')

    def activation(self, kind):
        if kind == 'act':
            kind = self.rng.choice(['relu', 'relux', 'maxmin'])
        if kind == 'maxmin' and self.shape[0] % 2:
            kind = self.rng.choice(['relu', 'relux'])
        if kind == 'relu':
            self.add(nn.ReLU(), 'ReLU')
        elif kind == 'relux':
            self.add(_thresholds(ReLU_x([1, *self.shape])), 'ReLUx')
        else:
            half = [1, self.shape[0] // 2, *self.shape[1:]]
            self.add(_clips(ClampGroupSort(half, 1.0, -1.0)), 'MaxMin')

    def flatten(self):
        if self.image:
            torch_flatten = self.rng.random() < 0.5
            self.add(nn.Flatten() if torch_flatten else Flatten(), 'nn.Flatten' if torch_flatten else 'Flatten')


def _scaled(layer, rng):
    """A layer with PyTorch's initialisation times a random scale in [0.5, 2.5], and a random bias."""
    scale = math.exp(rng.uniform(math.log(0.5), math.log(2.5)))
    with torch.no_grad():
        layer.weight.mul_(scale)
        if layer.bias is not None:
            layer.bias.normal_(0.0, 0.4)
    return layer


def _thresholds(layer):
    """Per-neuron thresholds in [0, 1.5] (a few exactly 0)."""
    with torch.no_grad():
        layer.threshold.uniform_(0.0, 1.5)
        layer.threshold[torch.rand_like(layer.threshold) < 0.05] = 0.0
    return layer


def _clips(layer):
    """Per-unit MaxMin clips: max in [0.05, 1.5], min in [-1.5, -0.05]."""
    with torch.no_grad():
        layer.max.uniform_(0.05, 1.5)
        layer.min.uniform_(-1.5, -0.05)
    return layer


def _plan(rng):
    """A random sequence of tokens ('affine', 'act', 'relu', 'relux', 'maxmin', 'flatten') with
    one or two motifs inserted, sometimes after a leading activation."""
    tokens = [rng.choice(['affine', 'affine', 'act']) for _ in range(rng.randrange(1, 5))]
    for _ in range(rng.randrange(1, 3)):
        at = rng.randrange(len(tokens) + 1)
        tokens[at:at] = list(rng.choice(MOTIFS))
    if rng.random() < 0.25:
        tokens.insert(0, 'act')
    tokens.insert(rng.randrange(len(tokens) + 1), 'flatten')
    return tokens


def random_network(seed):
    """The random network of ``seed`` (deterministic): image inputs [C, H, W] with C in 1..4 and
    H = W in 3..5, or 6..16 features; hidden widths even; a final Linear to 2..5 classes."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    if rng.random() < 0.6:
        shape = (rng.randrange(1, 5), *(2 * [rng.randrange(3, 6)]))
    else:
        shape = (rng.randrange(6, 17),)
    builder = _Builder(rng, shape)
    for token in _plan(rng):
        if token == 'affine':
            builder.affine()
        elif token == 'flatten':
            builder.flatten()
        else:
            builder.activation(token)
    builder.flatten()
    classes = rng.randrange(2, 6)
    builder.add(_scaled(nn.Linear(builder.shape[0], classes), rng), f'Linear({builder.shape[0]},{classes})')
    model = nn.Sequential(*builder.modules).eval()
    model.requires_grad_(False)
    return Network(seed, model, shape, builder.names, _motifs(builder.names))


def _motifs(names):
    """The motifs of a layer list, read from its names (Flatten is transparent)."""
    names = [n for n in names if not n.endswith('Flatten')]
    kinds = [n.split('(')[0] for n in names]
    acts = {'ReLU', 'ReLUx', 'MaxMin'}
    found = set()
    for a, b in zip(kinds, kinds[1:]):
        if a == 'MaxMin' and b in ('ReLU', 'ReLUx'):
            found.add(f'MaxMin->{b}')
        if a in acts and b in acts:
            found.add('activation->activation')
        if a not in acts and b not in acts:
            found.add('affine->affine')
    if kinds and kinds[0] in acts:
        found.add('activation first')
    if any(re.search(r',g([2-9])', n) for n in names):
        found.add('grouped conv')
    return found


# ----------------------------------------------------------------------------- checks

@dataclass
class Failure:
    kind: str              # broken / unconfirmed / norm below reference / reference broken
    settings: str          # 'default', 'refined' or 'reference'
    network: str           # Network.describe()
    motifs: tuple
    eps: float
    detail: str

    def line(self):
        return f'{self.kind} ({self.settings}) at eps {self.eps:.4g}: {self.detail} | {self.network}'


@dataclass
class Findings:
    networks: int = 0
    certificates: int = 0          # certificates of the pass checked (both settings)
    reference_certificates: int = 0
    norms: int = 0                 # per-sample norms of the pass compared
    failures: list = field(default_factory=list)

    def add(self, other):
        self.networks += other.networks
        self.certificates += other.certificates
        self.reference_certificates += other.reference_certificates
        self.norms += other.norms
        self.failures += other.failures

    def summary(self):
        return (f'{self.networks} networks, {self.certificates} certificates, {self.reference_certificates} '
                f'reference certificates, {self.norms} norms checked; {len(self.failures)} failures')

    def report(self, limit=10):
        """The summary, the failures counted by kind and by network class (its motifs), and the
        first failure of each of the first ``limit`` failing networks."""
        first = list({f.network: f for f in reversed(self.failures)}.values())[::-1]
        by_kind = Counter(f'{f.kind} ({f.settings})' for f in self.failures)
        by_class = Counter(', '.join(f.motifs) or 'no motif' for f in self.failures)
        networks = Counter(', '.join(f.motifs) or 'no motif' for f in first)
        return '\n'.join([self.summary()]
                         + [f'  {count} x {kind}' for kind, count in by_kind.most_common()]
                         + [f'  {count} failures in {networks[cls]} networks with motifs: {cls}'
                            for cls, count in by_class.most_common()]
                         + [f.line() for f in first[:limit]])


@dataclass
class Effort:
    """How hard ``check_network`` looks: inputs per network, eps factors, attack strength."""
    samples: int = 12
    eps_factors: tuple = (0.5, 1.0, 2.0)
    steps: int = 40
    restarts: int = 3
    points: int = 300


def sample_inputs(net, n, seed):
    """n inputs uniform in [0, 1] and the model's own predictions as labels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *net.input_shape, generator=generator)
    with torch.no_grad():
        return x, net.model(x).argmax(1)


def eps_scale(ref, x, y):
    """A radius where the reference certifies at most half of the samples: from the median clean
    margin over twice the product of the global norms (float64 SVD; every sample certifies well
    below it), doubled until at most half do, or until the ball holds the unit cube twice over
    (clipped MaxMin bounds the logits: some samples certify at any radius)."""
    with torch.no_grad():
        logits = ref.model(x.double())
    top2 = logits.topk(2, dim=1).values
    margin = float((top2[:, 0] - top2[:, 1]).median())
    product = math.prod(reference.global_norm(s.matrix) for s in ref.steps if s.matrix is not None)
    eps = max(margin / max(2.0 * product, 1e-12), 1e-6)
    largest = 2.0 * math.sqrt(x[0].numel())
    while eps < largest and 2 * int(ref.certified(x, y, eps).sum()) > len(y):
        eps *= 2
    return min(eps, largest)


def check_network(net, effort=Effort()):
    """Certify, attack and compare with the reference for one network (module docstring)."""
    findings = Findings(networks=1)
    x, y = sample_inputs(net, effort.samples, net.seed)
    ref = reference.Reference(net.model, net.input_shape)
    twin = ref.model
    scale = eps_scale(ref, x, y)
    for factor in effort.eps_factors:
        eps = scale * factor
        certified = {name: local_bound.certify(net.model, x, y, eps, s).cpu() for name, s in SETTINGS.items()}
        confirmed = ref.certified(x, y, eps)
        any_cert = confirmed | certified['default'] | certified['refined']
        findings.certificates += sum(int(c.sum()) for c in certified.values())
        findings.reference_certificates += int(confirmed.sum())
        gaps = torch.full((len(y),), -math.inf, dtype=torch.float64)
        if any_cert.any():
            gaps[any_cert] = reference.attack_gaps(twin, x[any_cert], y[any_cert], eps, steps=effort.steps,
                                                   restarts=effort.restarts, samples=effort.points,
                                                   seed=net.seed)
        for name, cert in {**certified, 'reference': confirmed}.items():
            for i in cert.nonzero().flatten().tolist():
                if gaps[i] >= 0:
                    kind = 'reference broken' if name == 'reference' else 'broken'
                    findings.failures.append(_failure(kind, name, net, eps, f'sample {i}: a point of the ball '
                                                      f'has max_j z_j - z_y = {float(gaps[i]):.3g} >= 0'))
                elif name != 'reference' and not confirmed[i]:
                    findings.failures.append(_failure('unconfirmed', name, net, eps,
                                                      f'sample {i}: the reference does not certify it'))
        findings.norms += _check_norms(net, ref, x, eps, findings)
    return findings


def _check_norms(net, ref, x, eps, findings):
    """Compare every per-sample norm of ``layer_norms`` (both settings) with the reference's
    (lenient masks); returns how many were compared."""
    lenient = ref.bounds(x, eps, tolerance=NORM_TOLERANCE)
    compared = 0
    for name, s in NORM_SETTINGS.items():
        norms = local_bound.layer_norms(net.model, x, eps, s)
        for index, own in lenient.norms.items():
            theirs = norms[index].double().cpu()
            low = theirs < own * (1 - NORM_RTOL) - 1e-12
            compared += len(own)
            for i in low.nonzero().flatten().tolist():
                findings.failures.append(_failure(
                    'norm below reference', name, net, eps,
                    f'layer {index}, sample {i}: {float(theirs[i]):.6g} < {float(own[i]):.6g}'))
    return compared


def _failure(kind, settings, net, eps, detail):
    return Failure(kind, settings, net.describe(), tuple(sorted(net.motifs)), eps, detail)


def run(seeds, effort=Effort(), progress=None):
    """``check_network`` over the networks of ``seeds``; ``progress`` wraps the iterable (tqdm)."""
    total = Findings()
    for seed in (progress(seeds) if progress is not None else seeds):
        total.add(check_network(random_network(seed), effort))
    return total
