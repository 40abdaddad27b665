"""Guaranteed spectral norms: upper bounds, exact or with a stated failure probability.

Power iteration and Lanczos approach a norm from below, so a certificate built on their estimates
can over-certify. The norms here are upper bounds (docs/certificates.md has the statement):

* **Exact** where the matrix is small enough to form: the float64 SVD of the explicit (masked)
  matrix, times ``1 + EXACT_MARGIN`` for its rounding.
* **Probabilistic** otherwise. Lanczos on ``A = M^T M`` (``M`` the masked operator, ``n`` the number
  of its varying input coordinates) from a start drawn uniformly on the unit sphere of those
  coordinates, after ``k`` products with ``A`` and no restart, gives a largest Ritz value ``theta_k``
  with ``P(theta_k < (1 - e) lambda_max(A)) <= 1.648 sqrt(n) exp(-sqrt(e) (2k - 1))``
  (the Lanczos bound of Kuczynski and Wozniakowski, "Estimating the largest eigenvalue by the
  power and Lanczos algorithms with a random start", SIAM J. Matrix Anal. Appl. 13(4), 1992,
  where ``k`` matrix-vector products give the Krylov space of dimension ``k``), whatever the gap between the top eigenvalues. Solving for
  ``e`` at a failure budget ``delta`` gives ``||M|| <= sqrt(theta_k / (1 - e))`` except with
  probability ``delta``. We apply it with ``k - 1`` in place of ``k`` (one step of slack).

Rounding. The recurrences' coefficients and the small tridiagonal problem are float64; its top
eigenvalue is bracketed by Sturm counts and the upper end of the bracket is used. The operator
products run in the layer's dtype on a copy of the weight scaled to a largest entry of 1 (no
underflow or overflow whatever the layer's scale); the relative margin ``ROUNDING[dtype]`` on
``theta`` covers their rounding (float32: 1e-4, about 100 times the errors measured against the
float64 SVD), and ``FLOOR`` (relative to the weight's scale) covers a masked norm so small that
its squares would underflow. Finite-precision Lanczos keeps the convergence of its exact
counterpart up to terms of the order of the rounding (Druskin and Knizhnerman 1991), which is
what the margins stand for: the theorem itself is one of exact arithmetic.
"""
import copy
import math

import torch

import spectral

KW_CONSTANT = 1.648
EXACT_MARGIN = 1e-9
ROUNDING = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
FLOOR = 1e-12
FIRST_CHECK = 32          # Lanczos steps at the first check; then doubling up to the maximum
EXPLICIT_GLOBAL_LIMIT = 2**22


def check_steps(max_steps):
    """The steps at which a guaranteed norm is checked: 32, 64, ... doubling, then ``max_steps``."""
    steps, k = [], FIRST_CHECK
    while k < max_steps:
        steps.append(k)
        k *= 2
    return steps + [max_steps]


def kw_relative_error(steps, dims, delta):
    """The relative error ``e`` with ``P(theta < (1 - e) lambda_max) <= delta`` after ``steps``
    Lanczos steps on a problem of dimension ``dims`` (a tensor); ``e >= 1`` means no bound yet.
    Uses ``steps - 1`` in the theorem (module docstring); ``dims <= 1`` is exact."""
    k = steps - 1
    if k < 1:
        return torch.where(dims <= 1, torch.zeros_like(dims, dtype=torch.float64),
                           torch.full_like(dims, math.inf, dtype=torch.float64))
    log_term = torch.log(KW_CONSTANT * dims.double().clamp(min=1).sqrt() / delta).clamp(min=0)
    e = (log_term / (2 * k - 1)) ** 2
    return torch.where(dims <= 1, torch.zeros_like(e), e)


def top_eigenvalue_bracket(diag, off, points=31, rtol=1e-13, max_rounds=40):
    """(lower, upper) bracketing the largest eigenvalue of each symmetric tridiagonal matrix with
    diagonal ``diag`` [m, k] and off-diagonal ``off`` [m, k-1] (float64), by Sturm counts, until
    ``upper - lower <= rtol * upper``.

    The first round counts at points a hair either side of the dense solver's top eigenvalue (when
    that is cheaper than bisection, ``DENSE_BRACKET_LIMIT``), which usually closes the bracket; the
    rounds after it count at ``points`` points evenly inside it. Either way only the counts decide:
    the guess places the points, it bounds nothing."""
    k = diag.size(1)
    spread = torch.zeros_like(diag)
    if k > 1:
        spread[:, :-1] += off.abs()
        spread[:, 1:] += off.abs()
    upper = (diag + spread).max(dim=1).values          # Gershgorin
    lower = diag.max(dim=1).values                     # lambda_max >= every diagonal entry
    off2 = off * off
    pivmin = torch.finfo(torch.float64).tiny * max(1.0, float(off2.max()) if off2.numel() else 1.0)
    fractions = torch.arange(1, points + 1, dtype=torch.float64, device=diag.device) / (points + 1)
    guess = _dense_top_eigenvalue(diag, off)
    if guess is not None:
        x = guess.unsqueeze(1) * (1 + rtol * GUESS_OFFSETS.to(diag.device))
        lower, upper = _narrowed(lower, upper, x, _count_below(diag, off2, x, pivmin) == k)
    for _ in range(max_rounds):
        open_ = upper - lower > rtol * upper.abs()
        if not open_.any():
            break
        x = lower.unsqueeze(1) + (upper - lower).unsqueeze(1) * fractions      # [m, points]
        new_lower, new_upper = _narrowed(lower, upper, x, _count_below(diag, off2, x, pivmin) == k)
        upper = torch.where(open_, new_upper, upper)
        lower = torch.where(open_, new_lower, lower)
    return lower, upper


# Where the guessed round counts, relative to the guess in units of the bracket's rtol: the inner
# pair closes the bracket when the dense solver is within rtol / 5 of the top eigenvalue, the outer
# pair when within 0.45 rtol.
GUESS_OFFSETS = torch.tensor([-0.45, -0.2, 0.2, 0.45], dtype=torch.float64)
# The dense solve takes m * k^3 flops and m * k^2 entries, the bisection about nine rounds of a
# k-step loop whatever m: at m * k^2 <= 2^20 (8 MiB of float64) the dense solve is the cheaper one.
DENSE_BRACKET_LIMIT = 2**20


def _dense_top_eigenvalue(diag, off):
    """The dense solver's largest eigenvalue [m] of each tridiagonal matrix, or None when the
    matrices are too large (``DENSE_BRACKET_LIMIT``) or the result is not finite."""
    m, k = diag.shape
    if k < 2 or m * k * k > DENSE_BRACKET_LIMIT:
        return None
    matrix = torch.diag_embed(diag)
    steps = torch.arange(k - 1, device=diag.device)
    matrix[:, steps, steps + 1] = off
    matrix[:, steps + 1, steps] = off
    top = torch.linalg.eigvalsh(matrix)[:, -1]
    return top if torch.isfinite(top).all() else None


def _narrowed(lower, upper, x, above_all):
    """The bracket after Sturm counts at the points ``x`` [m, p]: ``above_all`` [m, p] says that
    every eigenvalue lies below the point (an upper end), else the largest is at least the point."""
    big = torch.full_like(x, math.inf)
    new_upper = torch.where(above_all, x, big).min(dim=1).values
    new_lower = torch.where(above_all, -big, x).max(dim=1).values
    return torch.maximum(lower, new_lower), torch.minimum(upper, new_upper)


def _count_below(diag, off2, x, pivmin):
    """Number of eigenvalues below each point ``x`` [m, p]: negative pivots of ``T - x I``."""
    d = diag[:, :1] - x
    d = torch.where(d.abs() < pivmin, torch.full_like(d, -pivmin), d)
    count = (d < 0).to(torch.int64)
    for i in range(1, diag.size(1)):
        d = diag[:, i:i + 1] - x - off2[:, i - 1:i] / d
        d = torch.where(d.abs() < pivmin, torch.full_like(d, -pivmin), d)
        count += d < 0
    return count


def scaled_operator(op, dtype):
    """(an operator on a copy of ``op``'s layer in ``dtype`` with its weight scaled to a largest
    entry of 1, that scale as a float64 number)."""
    with torch.no_grad():
        scale = float(op.layer.weight.detach().double().abs().max())
        source = op.layer.plain() if hasattr(op.layer, 'plain') else op.layer   # a folded layer's values
        layer = copy.deepcopy(source, {id(source.__dict__.get(MEMO)): None}).to(dtype)   # not the memo
        if scale > 0 and math.isfinite(scale):
            layer.weight.div_(scale)
        layer.requires_grad_(False)
    return type(op)(layer, op.in_shape), scale


class KrylovRun:
    """Golub-Kahan-Lanczos on ``M = D_out W D_in`` for a batch, without restarts, keeping only the
    three-term recurrence (two vectors per sample): steps can be added and rows dropped between
    checks. ``bounds(delta)`` gives each sample's estimate and guaranteed upper bound of ``||M||``.

    ``starts`` [B, *in_shape]: independent standard normal vectors (masked and normalised here, so
    uniform on the sphere of the varying coordinates).
    """

    def __init__(self, op, in_mask, out_mask, starts, dtype=torch.float32):
        self.op, self.scale = scaled_operator(op, dtype)
        self.dtype = dtype
        self.in_mask = None if in_mask is None else in_mask.detach().flatten(1).to(dtype)
        self.out_mask = None if out_mask is None else out_mask.detach().flatten(1).to(dtype)
        p = starts.detach().flatten(1).to(dtype)
        if self.in_mask is not None:
            p = p * self.in_mask
        self.dims = (self.in_mask.sum(1) if self.in_mask is not None
                     else torch.full((p.size(0),), float(p.size(1)), device=p.device)).double()
        self.p = _unit(p)
        self.q = None
        self.alphas, self.betas = [], []

    @property
    def steps(self):
        return len(self.alphas)

    def _forward(self, p):
        out = self.op.linear(p.view(-1, *self.op.in_shape)).flatten(1)
        return out if self.out_mask is None else out * self.out_mask

    def _adjoint(self, q):
        back = self.op.adjoint(q.view(-1, *self.op.out_shape)).flatten(1)
        return back if self.in_mask is None else back * self.in_mask

    @torch.no_grad()
    def advance(self, steps):
        """Add ``steps`` steps (each applies M and M^T once to every remaining sample)."""
        for _ in range(steps):
            r = self._forward(self.p)
            if self.q is not None:
                r = r - self.betas[-1].to(self.dtype).unsqueeze(1) * self.q
            a = r.norm(dim=1)
            self.q = _unit(r, a)
            s = self._adjoint(self.q) - a.unsqueeze(1) * self.p
            b = s.norm(dim=1)
            self.p = _unit(s, b)
            self.alphas.append(a.double())
            self.betas.append(b.double())

    def keep(self, rows):
        """Drop every sample but ``rows`` (a bool or index tensor over the current samples)."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        self.p, self.q = self.p[rows], pick(self.q)
        self.in_mask, self.out_mask = pick(self.in_mask), pick(self.out_mask)
        self.dims = self.dims[rows]
        self.alphas = [a[rows] for a in self.alphas]
        self.betas = [b[rows] for b in self.betas]

    @torch.no_grad()
    def bounds(self, delta):
        """(estimate, upper bound) of every remaining sample's ``||M||`` [b] (float64).

        The estimate is the square root of the lower end of the top Ritz value's bracket (from
        below, no guarantee); the upper bound holds except with probability ``delta`` each."""
        alpha, beta = torch.stack(self.alphas, 1), torch.stack(self.betas, 1)
        # B^T B of the (k+1) x k lower bidiagonal B with M^T Q_k = P_{k+1} B; its top eigenvalue is
        # at least the Lanczos Ritz value of A on the Krylov space of dimension k
        diag = alpha * alpha + beta * beta
        off = alpha[:, 1:] * beta[:, :-1]
        low, high = top_eigenvalue_bracket(diag, off)
        e = kw_relative_error(self.steps, self.dims, delta)
        theta = high * (1 + ROUNDING[self.dtype]) + FLOOR ** 2
        upper = torch.where(e < 1, (theta / (1 - e).clamp(min=1e-300)).sqrt(), torch.full_like(e, math.inf))
        empty = self.dims == 0
        upper = torch.where(empty, torch.zeros_like(upper), upper) * self.scale
        estimate = torch.where(empty, torch.zeros_like(low), low.clamp(min=0).sqrt()) * self.scale
        return estimate, upper


# A Krylov upper bound below FLOOR_CHECK_RTOL under the start-free lower bound of its norm
# (``masked_norm_floor``) missed the top direction: it is replaced by inf (float32 sums of squares
# are accurate to about 1e-6, far inside this tolerance).
FLOOR_CHECK_RTOL = 1e-3


@torch.no_grad()
def masked_norm_floor(op, in_mask, out_mask, batch):
    """Per sample, a lower bound of ``||D_out W D_in||_2`` [batch] (float64) that no start vector
    enters: the largest L2 norm of a masked row or column, ``max_j ||M^T e_j||`` and
    ``max_i ||M e_i||``, from one product of the masks with the squared weight each way."""
    squared, scale = scaled_operator(op, torch.float32)
    squared.layer.weight.mul_(squared.layer.weight)
    mask = lambda m, shape: (torch.ones(batch, *shape, device=squared.layer.weight.device,  # noqa: E731
                                        dtype=torch.float32) if m is None
                             else m.detach().reshape(batch, *shape).float())
    inputs, outputs = mask(in_mask, op.in_shape), mask(out_mask, op.out_shape)
    rows = (squared.linear(inputs) * outputs).flatten(1).amax(1)
    columns = (squared.adjoint(outputs) * inputs).flatten(1).amax(1)
    return torch.maximum(rows, columns).double().clamp(min=0).sqrt() * scale


def checked_bounds(estimate, upper, floor):
    """(estimate, upper) where the upper bound is at least the start-free lower bound ``floor`` (up
    to ``FLOOR_CHECK_RTOL``), else (inf, inf): a start that missed the top direction certifies
    nothing, and the sample is decided at once (more steps from that start would not find it)."""
    missed = upper < floor.to(upper) * (1 - FLOOR_CHECK_RTOL)
    infinite = torch.full_like(upper, math.inf)
    return torch.where(missed, infinite, estimate), torch.where(missed, infinite, upper)


def _unit(t, norm=None):
    """Rows of ``t`` scaled to unit length (a zero row stays zero)."""
    norm = t.norm(dim=1) if norm is None else norm
    return t / norm.clamp(min=torch.finfo(t.dtype).tiny).unsqueeze(1)


@torch.no_grad()
def explicit_norm_bounds(op, in_mask, out_mask, batch):
    """Exact per-sample ``||D_out W D_in||`` [batch] from the float64 SVD of the explicit masked
    matrix, with its rounding margin (an upper bound without failure probability)."""
    op64, scale = scaled_operator(op, torch.float64)
    double = lambda t: None if t is None else t.detach().double()  # noqa: E731
    sigma = spectral.explicit_masked_norms(op64, double(in_mask), double(out_mask), batch)
    return sigma * (1 + EXACT_MARGIN) * scale + FLOOR * scale


def explicit_size(op):
    """Entries of the explicit matrix of ``op``."""
    return math.prod(op.in_shape) * math.prod(op.out_shape)


# The attribute of a layer that remembers its last global norm: (key, weight copy, bound). It lives
# with the layer (no module state), and is reused only when every input of the computation is equal.
MEMO = '_guaranteed_global_norm'
# The layer attributes an operator computes with besides its weight (those the layer has).
LAYER_CONFIG = ('in_features', 'out_features', 'in_channels', 'out_channels', 'kernel_size', 'stride',
                'padding', 'dilation', 'groups', 'padding_mode', 'transposed', 'output_padding')


def operator_key(op):
    """Everything but the weight's values that ``op``'s matrix depends on: operator and layer
    types, input shape, the layer's configuration (``LAYER_CONFIG``), weight shape, dtype, device."""
    layer, weight = op.layer, op.layer.weight
    config = tuple((name, getattr(layer, name)) for name in LAYER_CONFIG if hasattr(layer, name))
    return (type(op), type(layer), tuple(op.in_shape), config, tuple(weight.shape), weight.dtype, weight.device)


@torch.no_grad()
def global_norm_bound(op, steps, delta, seed, memo_on=None):
    """An upper bound of ``||W||_2`` (a float): exact for a matrix of at most
    ``EXPLICIT_GLOBAL_LIMIT`` entries, else Lanczos (float32 products, the margins of the module
    docstring) from a seeded uniform start for ``steps`` steps (fails with probability at most
    ``delta``), refused (inf) below the start-free lower bound ``masked_norm_floor``.

    Remembered on the layer (attribute ``MEMO``) and reused only while the weight is equal entry by
    entry and ``operator_key`` (stride, padding, ..., input shape, dtype, device) is too, with, for
    Lanczos, the same steps, delta and seed. ``memo_on``: the module that keeps the memo (default
    ``op.layer``; a float64 copy's original, say)."""
    holder = op.layer if memo_on is None else memo_on
    weight = op.layer.weight.detach()
    exact = explicit_size(op) <= EXPLICIT_GLOBAL_LIMIT
    key = operator_key(op) + (() if exact else (steps, delta, seed))
    hit = holder.__dict__.get(MEMO)
    if hit is not None and hit[0] == key and torch.equal(hit[1], weight):
        return hit[2]
    if exact:
        value = float(explicit_norm_bounds(op, None, None, 1)[0])
    else:
        run = _global_run(op, steps, seed)
        value = float(checked_bounds(*run.bounds(delta), masked_norm_floor(op, None, None, 1))[1][0])
    holder.__dict__[MEMO] = (key, weight.clone(), value)
    return value


@torch.no_grad()
def global_norm_estimate(op, steps, seed):
    """An estimate of ``||W||_2`` from below (a float), the counterpart of ``global_norm_bound``:
    the float64 SVD of a matrix of at most ``EXPLICIT_GLOBAL_LIMIT`` entries, else the top Ritz
    value of ``steps`` Lanczos steps from the same seeded start (no warm vector moves, the global
    random state is not read)."""
    if explicit_size(op) <= EXPLICIT_GLOBAL_LIMIT:
        op64, scale = scaled_operator(op, torch.float64)
        return float(spectral.explicit_masked_norms(op64, None, None, 1)[0]) * scale
    return float(_global_run(op, steps, seed).bounds(0.5)[0][0])


def _global_run(op, steps, seed):
    """A KrylovRun of ``steps`` steps on ``op``'s plain matrix from the start seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(1, *op.in_shape, generator=generator).to(op.layer.weight.device)
    run = KrylovRun(op, None, None, start, dtype=torch.float32)
    run.advance(steps)
    return run
