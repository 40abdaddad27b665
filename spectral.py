"""Spectral norms of the bound pass (docs/method.md §2).

* ``global_spectral_norm``: ``||W||_2`` by power iteration whose vector persists across calls (warm
  start); ``global_vectors_state``/``load_global_vectors`` save and restore those vectors.
* ``masked_spectral_norm``: per-sample ``||D_out W D_in||_2`` by power iteration (the authors').
* ``lanczos_masked_norm``: the same norms by Golub-Kahan-Lanczos, batched, with per-sample stopping.
* ``precise_masked_norms``: float64 norms for audits (Lanczos to a tight residual, or the SVD of
  the explicit masked matrix when it is small).

An operator ``op`` is any object with ``layer`` (holding ``weight``), ``in_shape``, ``out_shape``,
``linear(x)`` (``W x`` for a batch of inputs) and ``adjoint(y)`` (``W^T y``).
"""
import contextlib
import copy
import math

import torch

from norms import batch_norms

LOCAL_TOL = 1e-3       # early stop of the per-sample masked power iteration (change of u)
GLOBAL_TOL = 1e-4      # early stop of the global power iteration
LANCZOS_TOL = 1e-4     # per-sample stop of Lanczos: relative Ritz residual
LANCZOS_CONFIRM = 2.0  # ... reached again after the Krylov dimension grew this much since first reached
LANCZOS_DIM = 64       # Lanczos steps between restarts
LANCZOS_MEMORY = 2**28  # bytes of Krylov basis held at once; larger batches run in chunks
POWER_GRADS = ('unrolled', 'final')
METHODS = ('power', 'lanczos', 'precise')
REORTHS = ('none', 'full')


# ----------------------------------------------------------------------------- global norms

# Each affine layer keeps its warm global vector as a non-persistent buffer ``power_vector``: it
# lives with the model (moves with .to(), is saved by global_vectors_state into our checkpoints)
# but stays out of the state_dict, so the authors' checkpoints still load.
VECTOR = 'power_vector'


def warm_vector(layer):
    """The layer's warm global power-iteration vector, or None."""
    return getattr(layer, VECTOR, None)


def set_warm_vector(layer, u):
    if VECTOR in layer._buffers:
        layer._buffers[VECTOR] = u
    else:
        layer.register_buffer(VECTOR, u, persistent=False)


def global_vectors_state(model):
    """{layer index: persistent global power-iteration vector} of ``model`` (for checkpoints)."""
    return {i: warm_vector(layer).cpu() for i, layer in enumerate(model) if warm_vector(layer) is not None}


def load_global_vectors(model, state):
    device = next(model.parameters()).device
    for i, u in state.items():
        set_warm_vector(model[int(i)], u.to(device))


def global_vector_shape(op):
    """Shape of the persistent vector: a Linear layer keeps it in its output space (as the
    authors do), a convolution in its input space."""
    return op.out_shape if isinstance(op.layer, torch.nn.Linear) else op.in_shape


def global_spectral_norm(op, iters, tol=GLOBAL_TOL, grad='unrolled'):
    """``||W||_2`` by power iteration, warm-started from the layer's last vector."""
    shape, weight = global_vector_shape(op), op.layer.weight
    u = warm_vector(op.layer)
    if u is None or u.shape[1:] != shape or u.device != weight.device or u.dtype != weight.dtype:
        u = torch.randn(1, *shape, device=weight.device, dtype=weight.dtype)
    u = usable_vectors(u)
    if isinstance(op.layer, torch.nn.Linear):
        sigma, u = _output_side_power_iteration(weight, u, iters, tol, grad)
    else:
        sigma, u = _power_iteration(op, u, None, None, iters, tol, grad)
    set_warm_vector(op.layer, u.detach())
    return sigma[0]


def usable_vectors(u):
    """``u`` [B, ...] (unit vectors kept between calls) with every row that cannot serve as a start
    vector (norm zero, below 1e-3, NaN or inf) replaced by a fresh standard normal row."""
    norms = u.detach().float().flatten(1).norm(dim=1)
    bad = ~(torch.isfinite(norms) & (norms > 1e-3))
    if not bad.any():
        return u
    u = u.clone()
    u[bad] = torch.randn(int(bad.sum()), *u.shape[1:], device=u.device).to(u.dtype)
    return u


def _output_side_power_iteration(weight, u, iters, tol, grad):
    """The authors' global iteration of a Linear layer: ``v = W^T u/|W^T u|``, ``u = W v/|W v|``
    (no EPS), stop once u moves less than ``tol``; ``sigma = u^T W v``. Returns (sigma [1], u)."""
    _check_grad(grad)
    overflow = False
    with torch.no_grad() if grad == 'final' else contextlib.nullcontext():
        for it in range(iters):
            previous = u
            v = u @ weight
            v_norm = v.norm()
            v = v / v_norm.clamp(min=torch.finfo(v.dtype).tiny)
            u = v @ weight.t()
            u_norm = u.norm()
            u = u / u_norm.clamp(min=torch.finfo(u.dtype).tiny)
            overflow = not bool(torch.isfinite(v_norm) & torch.isfinite(u_norm))
            if overflow or it + 1 == iters or (u - previous).norm() < tol:
                break
    sigma = (u * (v @ weight.t())).sum().view(1)
    if overflow:        # a norm past the dtype's range: no estimate, never a certificate from it
        return torch.full_like(sigma, math.inf), torch.randn_like(u)
    return sigma, u


def _check_grad(grad):
    if grad not in POWER_GRADS:
        raise ValueError(f'power-iteration gradient must be one of {POWER_GRADS}, not {grad!r}')


# ----------------------------------------------------------------------------- power iteration

def masked_spectral_norm(op, u, in_mask, out_mask, iters, tol=LOCAL_TOL, grad='unrolled'):
    """Per-sample ``||D_out W D_in||_2`` by power iteration from start vectors ``u`` [B, *in_shape].

    ``grad='unrolled'``: gradients flow through the iterations (masks are constants).
    ``grad='final'``: the iterations run without autograd and only the final estimate
    ``<v, D_out W D_in u>`` is differentiated, with u and v held fixed (the usual spectral-norm
    gradient; same value, and the same gradient once the vectors have converged).
    Returns (sigma [B], final u).
    """
    return _power_iteration(op, u, in_mask, out_mask, iters, tol, grad)


def _power_iteration(op, u, in_mask, out_mask, iters, tol, grad='unrolled'):
    """Alternate ``v = normalise(D_out W D_in u)``, ``u = normalise(D_in W^T v)``.

    Stops after ``iters`` rounds or once no sample's ``u`` moved by ``tol`` or more (one stop for
    the whole batch). The estimate ``<v, D_out W D_in u>`` equals ``|D_in W^T v|`` for the final u,
    so it costs no extra operator application. Normalisations divide by the norm itself (at least
    the dtype's smallest normal number), so the layer's scale does not matter; a start row that is
    zero on ``D_in`` (a stored vector of an example whose varying neurons changed) is re-drawn.
    """
    _check_grad(grad)
    final = grad == 'final'
    with torch.no_grad() if final else contextlib.nullcontext():
        # after the first round u = D_in W^T v / |.| already has D_in u = u: mask the start only
        u, masked = _redrawn_where_degenerate(u, in_mask)
        for it in range(iters):
            previous = u
            out = op.linear(masked)
            if out_mask is not None:
                out = out.mul_(out_mask) if final else out * out_mask
            out_norm = batch_norms(out)
            v = _normalised(out, final, out_norm)
            back = op.adjoint(v)
            if in_mask is not None:
                back = back.mul_(in_mask) if final else back * in_mask
            norm = batch_norms(back)
            u = masked = _normalised(back, final, norm)
            if it + 1 == iters or (u - previous).flatten(1).norm(dim=1).max() < tol:
                break
        # |M u| past the dtype's range normalises v to 0 and would read as a norm of 0: inf instead
        sigma = torch.where(torch.isfinite(out_norm.flatten()), norm.flatten(), math.inf)
    if final and torch.is_grad_enabled() and op.layer.weight.requires_grad:
        # v = D_out v and u = D_in u already, so d<v, D_out W D_in u>/dW = sum_b g_b v_b u_b^T
        sigma = _RayleighQuotient.apply(op.layer.weight, sigma, op, u, v)
    return sigma, u


def _normalised(t, in_place, norm=None):
    """``t / |t|`` per sample, a zero sample staying zero (in place when ``in_place``)."""
    norm = (batch_norms(t) if norm is None else norm).clamp(min=torch.finfo(t.dtype).tiny)
    return t.div_(norm) if in_place else t / norm


def _redrawn_where_degenerate(u, in_mask):
    """(``u`` with fresh standard normal rows where ``u`` masked by ``in_mask`` is zero, NaN or inf,
    that masked start)."""
    masked = u * in_mask if in_mask is not None else u
    norms = masked.detach().flatten(1).norm(dim=1)
    bad = ~(torch.isfinite(norms) & (norms > 0))
    if in_mask is not None and bad.any():          # an empty mask has norm 0 whatever the start
        bad &= in_mask.detach().flatten(1).any(dim=1)
    if not bad.any():
        return u, masked
    u = torch.where(bad.view(-1, *([1] * (u.dim() - 1))), torch.randn_like(u), u)
    return u, (u * in_mask if in_mask is not None else u)


class _RayleighQuotient(torch.autograd.Function):
    """sigma = <v, W u> per sample with u, v fixed: forward returns the known value, backward
    gives only the weight gradient (one weight-gradient call, no forward operator application)."""

    @staticmethod
    def forward(ctx, weight, sigma, op, u, v):
        ctx.op = op
        ctx.save_for_backward(u, v)
        return sigma.clone()

    @staticmethod
    def backward(ctx, grad_sigma):
        u, v = ctx.saved_tensors
        scaled = v * grad_sigma.view(-1, *([1] * (v.dim() - 1)))
        return ctx.op.weight_grad(u, scaled), None, None, None, None


# ----------------------------------------------------------------------------- Lanczos

def lanczos_masked_norm(op, u, in_mask, out_mask, iters, tol=LANCZOS_TOL, *, reorth='none', dtype=None,
                        krylov_dim=LANCZOS_DIM, memory=LANCZOS_MEMORY, confirm=LANCZOS_CONFIRM):
    """Per-sample ``||D_out W D_in||_2`` by Lanczos from start vectors ``u`` [B, *in_shape].

    Golub-Kahan-Lanczos bidiagonalisation of ``M = D_out W D_in`` (Lanczos on
    ``A = D_in W^T D_out W D_in``): step j applies M and M^T once each, the same work as one round
    of power iteration, and one application serves the whole batch. After k steps
    ``sigma^2`` is the top Ritz value of ``M M^T`` on ``M K_k(A, u)``; that space holds the power
    iterate, so ``sigma`` is never below the power iteration's ``|D_in W^T v|`` after k rounds from
    the same start (and never above the true norm). The small tridiagonal problem of each sample
    is solved by ``torch.linalg.eigh`` in float64.

    A small residual says the Ritz value is near *some* singular value, not the top one: a start
    vector with a tiny component on the top singular vector settles first on the second one and
    finds the top only some steps later (seen on trained conv layers: 0.9% low). So a sample stops
    only when its relative Ritz residual is at most ``tol`` at a step ``k >= confirm * k0``, where
    ``k0`` is the first step at which it was (the Krylov space keeps growing as long as it took to
    look converged), and then costs no more work; after ``iters`` steps all stop. Every
    ``krylov_dim`` steps the process restarts from the current Ritz vector; samples run in chunks
    so that the basis stays within ``memory`` bytes.
    ``reorth='full'`` re-orthogonalises every new vector against the whole basis (twice).
    ``dtype`` (e.g. torch.float64) runs the iteration in that precision.

    Returns (sigma [B], final u [B, *in_shape]: the unit Ritz vector, zero where ``D_in`` is empty).
    Without autograd sigma is the Ritz value; with autograd (and a weight that requires grad) it
    is ``|D_out W D_in u|`` for the final u, differentiable in W with u held fixed (its value is at
    least the Ritz value and at most the true norm).
    """
    if reorth not in REORTHS:
        raise ValueError(f'reorth must be one of {REORTHS}, not {reorth!r}')
    work = _operator_in_dtype(op, dtype or u.dtype)
    cast = lambda t: None if t is None else t.to(work.layer.weight.dtype)  # noqa: E731
    with torch.no_grad():
        rule = _StopRule(iters, tol, confirm, krylov_dim, reorth == 'full')
        sigma, final = _chunked_lanczos(work, cast(u), cast(in_mask), cast(out_mask), rule, memory)
    sigma, final = sigma.to(u.dtype), final.to(u.dtype)
    if torch.is_grad_enabled() and op.layer.weight.requires_grad:
        sigma = _masked_image_norm(op, final, in_mask, out_mask)
    return sigma, final


def _operator_in_dtype(op, dtype):
    """``op`` itself, or the same operator on a copy of its layer in ``dtype``."""
    if op.layer.weight.dtype == dtype:
        return op
    with torch.no_grad():
        layer = copy.deepcopy(op.layer).to(dtype)
    return type(op)(layer, op.in_shape)


def _masked_image_norm(op, u, in_mask, out_mask):
    """``|D_out W D_in u|`` per sample (differentiable)."""
    out = op.linear(u * in_mask if in_mask is not None else u)
    if out_mask is not None:
        out = out * out_mask
    return out.flatten(1).norm(dim=1)


class _StopRule:
    """When Lanczos stops: ``iters`` steps at most, restarts every ``krylov_dim`` steps, and a
    sample's stop once its relative residual is at most ``tol`` at a step ``>= confirm`` times the
    first step at which it was (``full``: full re-orthogonalisation)."""

    def __init__(self, iters, tol, confirm, krylov_dim, full):
        if confirm < 1:
            raise ValueError(f'confirm must be at least 1, not {confirm}')
        self.iters, self.tol, self.confirm, self.krylov_dim, self.full = iters, tol, confirm, krylov_dim, full

    def converged(self, step, residual, sigma, first):
        """(which samples stop at the 1-based ``step``, counted over restarts; ``first`` [a] updated:
        the first step with a small residual, 0 before)."""
        small = residual <= self.tol
        first = torch.where((first == 0) & small, step, first)
        return (small & (step >= self.confirm * first)) | (sigma == 0), first


def _chunked_lanczos(op, u, in_mask, out_mask, rule, memory):
    """``_lanczos`` over chunks of the batch sized so that one chunk's basis fits in ``memory``."""
    n_in, n_out = math.prod(op.in_shape), math.prod(op.out_shape)
    per_sample = (rule.krylov_dim + 1) * (n_in + (n_out if rule.full else 0)) * u.element_size()
    chunk = max(1, memory // per_sample)
    pick = lambda t, s: None if t is None else t[s]  # noqa: E731
    sigmas, finals = [], []
    for start in range(0, u.size(0), chunk):
        part = slice(start, start + chunk)
        sigma, final = _lanczos(op, u[part], pick(in_mask, part), pick(out_mask, part), rule)
        sigmas.append(sigma)
        finals.append(final)
    return torch.cat(sigmas), torch.cat(finals)


class _Masked:
    """``M = D_out W D_in`` and ``M^T`` on flat vectors of a subset of the batch's samples."""

    def __init__(self, op, in_mask, out_mask):
        self.op, self.in_shape, self.out_shape = op, op.in_shape, op.out_shape
        self.in_mask = None if in_mask is None else in_mask.flatten(1)
        self.out_mask = None if out_mask is None else out_mask.flatten(1)

    def forward(self, p, rows):
        """M p for unit vectors p already supported on D_in."""
        out = self.op.linear(p.view(-1, *self.in_shape)).flatten(1)
        return out if self.out_mask is None else out.mul_(self.out_mask[rows])

    def adjoint(self, q, rows):
        back = self.op.adjoint(q.view(-1, *self.out_shape)).flatten(1)
        return back if self.in_mask is None else back.mul_(self.in_mask[rows])


def _lanczos(op, u, in_mask, out_mask, rule):
    """Restarted Golub-Kahan-Lanczos for one chunk. Returns (sigma [b], unit Ritz vectors [b, *in_shape])."""
    masked = _Masked(op, in_mask, out_mask)
    start = u.flatten(1) if in_mask is None else u.flatten(1) * masked.in_mask
    norms = start.norm(dim=1, keepdim=True)
    start = torch.where(norms > 0, start / norms.clamp(min=torch.finfo(start.dtype).tiny), start)
    sigma = start.new_zeros(start.size(0), dtype=torch.float64)
    final = start.clone()                    # an empty mask keeps sigma 0 and u 0
    running = torch.nonzero(norms.flatten() > 0).flatten()
    first = torch.zeros(start.size(0), dtype=torch.long, device=start.device)
    done_steps = 0
    while running.numel() and done_steps < rule.iters:
        steps = min(rule.krylov_dim, rule.iters - done_steps)
        cycle = _LanczosCycle(masked, start[running], running, steps, rule, done_steps, first[running])
        sigma[running], final[running], converged = cycle.run()
        first[running] = cycle.first
        start[running] = final[running]
        running = running[~converged]
        done_steps += steps
    return sigma, final.view(-1, *op.in_shape)


class _LanczosCycle:
    """Up to ``steps`` Lanczos steps from unit start vectors ``p`` of the samples ``rows``.

    Keeps the input-side basis P (for the Ritz vectors) and, with full re-orthogonalisation, the
    output-side basis Q; alpha/beta are the diagonal and sub-diagonal of the lower bidiagonal B
    with ``M^T Q_k = P_{k+1} B``. Converged samples (``rule``, steps counted from ``offset``, the
    steps of earlier cycles; ``first``: see ``_StopRule``) drop out of the active set.
    """

    def __init__(self, masked, p, rows, steps, rule, offset, first):
        b, n_in = p.shape
        self.masked, self.rows, self.steps, self.rule, self.offset = masked, rows, steps, rule, offset
        self.full, self.first = rule.full, first      # first: this cycle's own copy (gathered rows)
        self.P = p.new_empty(b, steps + 1, n_in)     # column j + 1 is written at step j, before any read
        self.P[:, 0] = p
        n_out = math.prod(masked.out_shape)
        self.Q = p.new_empty(b, steps, n_out) if self.full else None
        self.alpha = torch.zeros(b, steps, dtype=torch.float64, device=p.device)
        self.beta = torch.zeros_like(self.alpha)
        self.sigma = torch.zeros(b, dtype=torch.float64, device=p.device)
        self.final = p.clone()
        self.converged = torch.zeros(b, dtype=torch.bool, device=p.device)

    def run(self):
        count = self.P.size(0)
        active = None                 # all samples: plain slices, no gathers
        q_prev = None
        for j in range(self.steps):
            rows = slice(None) if active is None else active
            q_prev = self._step(j, rows, q_prev)
            theta, y = self._ritz(j, rows)
            sigma = theta.clamp(min=0).sqrt()
            residual = self.beta[rows, j] * y[:, -1].abs() / sigma.clamp(min=torch.finfo(sigma.dtype).tiny)
            converged, self.first[rows] = self.rule.converged(self.offset + j + 1, residual, sigma,
                                                              self.first[rows])
            stop = converged | (j + 1 == self.steps)
            if stop.any():
                ids = torch.arange(count, device=stop.device) if active is None else active
                self._finish(j, ids[stop], sigma[stop], y[stop])
                self.converged[ids[stop]] = converged[stop]
                active, q_prev = ids[~stop], q_prev[~stop]
                if not active.numel():
                    break
        return self.sigma, self.final, self.converged

    def _step(self, j, active, q_prev):
        """One application of M and of M^T for the ``active`` samples (a slice or an index tensor);
        fills alpha_j, beta_j and p_{j+1}."""
        rows = self.rows[active]
        p = self.P[active, j]
        r = self.masked.forward(p, rows)                    # fresh tensors: updated in place
        if j > 0:
            r.addcmul_(self.beta[active, j - 1].to(r.dtype).unsqueeze(1), q_prev, value=-1)
        if self.full and j > 0:
            r = _orthogonalised(r, self.Q[active, :j])
        a = r.norm(dim=1)
        q = r.div_(a.unsqueeze(1).clamp(min=torch.finfo(r.dtype).tiny))
        if self.full:
            self.Q[active, j] = q
        s = self.masked.adjoint(q, rows).addcmul_(a.unsqueeze(1), p, value=-1)
        if self.full:
            s = _orthogonalised(s, self.P[active, :j + 1])
        b = s.norm(dim=1)
        self.P[active, j + 1] = s.div_(b.unsqueeze(1).clamp(min=torch.finfo(s.dtype).tiny))
        self.alpha[active, j], self.beta[active, j] = a.double(), b.double()
        return q

    def _ritz(self, j, active):
        """Top eigenpair of ``B^T B`` (k = j + 1): the tridiagonal with diagonal alpha^2 + beta^2 and
        off-diagonal alpha_{i+1} beta_i. Returns (theta [a], y [a, k])."""
        a, b = self.alpha[active, :j + 1], self.beta[active, :j + 1]
        t = torch.diag_embed(a * a + b * b)
        if j > 0:
            off = a[:, 1:] * b[:, :-1]
            t = t + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        broken = ~torch.isfinite(t).flatten(1).all(dim=1)       # the operator overflowed
        if broken.any():
            t = torch.where(broken.view(-1, 1, 1), torch.zeros_like(t), t)
        values, vectors = torch.linalg.eigh(t)
        top = torch.where(broken, torch.full_like(values[:, -1], math.inf), values[:, -1])
        return top, vectors[:, :, -1]

    def _finish(self, j, samples, sigma, y):
        """Ritz value and unit input-side Ritz vector ``P_{k+1} B y / sigma`` of ``samples``."""
        a, b = self.alpha[samples, :j + 1], self.beta[samples, :j + 1]
        coeff = torch.zeros(len(samples), j + 2, dtype=torch.float64, device=y.device)
        coeff[:, :j + 1] += a * y
        coeff[:, 1:] += b * y
        u = torch.bmm(coeff.to(self.P.dtype).unsqueeze(1), self.P[samples, :j + 2]).squeeze(1)
        norm = u.norm(dim=1, keepdim=True)
        good = (norm > 0).flatten()
        self.final[samples] = torch.where(good.unsqueeze(1), u / norm.clamp(min=torch.finfo(u.dtype).tiny),
                                          self.P[samples, 0])
        self.sigma[samples] = sigma


def _orthogonalised(x, basis):
    """x minus its projection on the rows of ``basis`` [a, j, n] (classical Gram-Schmidt, twice)."""
    for _ in range(2):
        x = x - torch.bmm(torch.bmm(basis, x.unsqueeze(2)).transpose(1, 2), basis).squeeze(1)
    return x


def masked_norm(op, u, in_mask, out_mask, iters, *, method='power', tol=None, grad='unrolled'):
    """Per-sample masked norm by ``method`` ('power', 'lanczos' or 'precise' for audits; ``tol``
    None: its default). Returns (sigma [B], final vectors)."""
    if method == 'power':
        return masked_spectral_norm(op, u, in_mask, out_mask, iters, LOCAL_TOL if tol is None else tol, grad)
    if method == 'lanczos':
        return lanczos_masked_norm(op, u, in_mask, out_mask, iters, LANCZOS_TOL if tol is None else tol)
    if method == 'precise':     # audits: float64, to relative residual tol (default 1e-6); u kept
        sigma = precise_masked_norms(op, in_mask, out_mask, start=u, rtol=1e-6 if tol is None else tol,
                                     batch=u.size(0))
        return sigma.to(u.dtype), u
    raise ValueError(f'spectral method must be one of {METHODS}, not {method!r}')


# ----------------------------------------------------------------------------- audits

def precise_masked_norms(op, in_mask, out_mask, *, start=None, rtol=1e-6, max_iter=3000,
                         explicit_limit=2**22, krylov_dim=64, batch=None):
    """Float64 per-sample ``||D_out W D_in||_2`` [B] for audits.

    When ``in_dim * out_dim <= explicit_limit`` the masked matrix is built explicitly and its
    largest singular value taken (``torch.linalg.matrix_norm(ord=2)``); otherwise Lanczos in
    float64 with full re-orthogonalisation runs until the relative Ritz residual is below ``rtol``
    (at most ``max_iter`` steps) from ``start`` (default: random normal vectors).
    ``batch``: the number of samples (default: read from the masks or ``start``, else 1).
    """
    if batch is None:
        batch = next((t.size(0) for t in (in_mask, out_mask, start) if t is not None), 1)
    n_in, n_out = math.prod(op.in_shape), math.prod(op.out_shape)
    op64 = _operator_in_dtype(op, torch.float64)
    double = lambda t: None if t is None else t.double()  # noqa: E731
    if n_in * n_out <= explicit_limit:
        return explicit_masked_norms(op64, double(in_mask), double(out_mask), batch)
    if start is None:
        start = torch.randn(batch, *op.in_shape, dtype=torch.float64, device=op.layer.weight.device)
    with torch.no_grad():
        sigma, _ = lanczos_masked_norm(op64, start.double(), double(in_mask), double(out_mask), max_iter,
                                       rtol, reorth='full', krylov_dim=krylov_dim)
    return sigma


def precise_global_norm(op, rtol=1e-6, mix=0.1, explicit_limit=2**22):
    """Float64 ``||W||_2`` (a tensor [1]) for metrics and audits, the layer's warm power-iteration
    vector untouched. When that vector exists the Lanczos start is it (moved to the input side for a
    Linear layer) plus ``mix`` of a random unit vector, so that every direction is present: a
    trained network's layers then converge in a few dozen steps instead of hundreds."""
    warm = warm_vector(op.layer)
    start = None
    if warm is not None and warm.shape[1:] == tuple(global_vector_shape(op)):
        with torch.no_grad():
            warm = warm.to(op.layer.weight.dtype)
            v = op.adjoint(warm) if isinstance(op.layer, torch.nn.Linear) else warm
            v = v.double() / v.norm().double().clamp(min=1e-300)
            noise = torch.randn_like(v)
            start = v + mix * noise / noise.norm()
    return precise_masked_norms(op, None, None, start=start, rtol=rtol, batch=1, explicit_limit=explicit_limit)


@torch.no_grad()
def explicit_masked_norms(op, in_mask, out_mask, batch):
    """Largest singular value of the explicit masked matrix of each sample (in the dtype of ``op``;
    float64 for audits and guaranteed norms)."""
    if isinstance(op.layer, torch.nn.Linear):
        matrix = op.layer.weight                                            # [n_out, n_in]
    else:
        n_in = math.prod(op.in_shape)
        basis = torch.eye(n_in, dtype=op.layer.weight.dtype, device=op.layer.weight.device)
        matrix = op.linear(basis.view(n_in, *op.in_shape)).flatten(1).t()
    chunk = max(1, 2**27 // (matrix.numel() * 8))
    sigmas = []
    for s in range(0, batch, chunk):
        rows = range(s, min(batch, s + chunk))
        m = matrix.expand(len(rows), -1, -1)
        if out_mask is not None:
            m = m * out_mask[s:s + len(rows)].flatten(1).unsqueeze(2)
        if in_mask is not None:
            m = m * in_mask[s:s + len(rows)].flatten(1).unsqueeze(1)
        sigmas.append(torch.linalg.matrix_norm(m, ord=2))
    return torch.cat(sigmas)
