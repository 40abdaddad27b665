"""The last layer: worst-case logits from the penultimate ball and box (docs/method.md §3, BCP).

Every translation entry is ``max <w, d>`` subject to ``|d|_2 <= r`` and ``lower <= d <= upper``
(``lower <= 0 <= upper``, relative to the ball's centre), for ``w`` a difference of two rows of the
last weight matrix. Two solvers: the authors' clip-and-rescale iteration (``'iterative'``, an upper
estimate that converges to the optimum from above) and an exact one (``'exact'``). Two layouts:
the label column only (``'label'``, B x C problems) or every pair (``'pairwise'``, B x C x C).
"""
import torch
import torch.nn.functional as F

EPS = 1e-12
TRANSLATIONS = ('iterative', 'exact')
LAYOUTS = ('label', 'pairwise')


def clip_and_rescale(directions, lower, upper, radius, active, opt_iter):
    """``max <w, d>`` s.t. ``|d| <= radius``, ``lower <= d <= upper`` for every direction w.

    directions [B, K, h]; lower/upper [B, 1, h] with lower <= 0 <= upper; radius [B]; active [B, K, 1]
    (0 marks a trivial problem, w = 0). Starts at ``radius * w/|w|`` and, while some coordinate
    leaves the box (at most ``opt_iter`` rounds), clips those to the box and rescales the free ones
    so that ``|d| = radius``. Returns the inner products [B, K] (an upper estimate of the optimum).
    """
    r = radius.view(-1, 1, 1)
    d = r * F.normalize(directions, p=2, dim=-1)
    target = active * (r + EPS) + EPS
    trivial = 1.0 - active
    for it in range(opt_iter):
        if it > 0 and not ((active * d < lower) | (active * d > upper)).any():
            break
        at_lower, at_upper = (d <= lower).to(d.dtype), (d >= upper).to(d.dtype)
        after = active * lower * at_lower + active * upper * at_upper
        norm_after = (active * (after + EPS)).norm(dim=-1, keepdim=True)
        inside = ((d > lower) & (d < upper)).to(d.dtype)
        free = active * d * inside
        # the free part's norm is measured, not taken as sqrt(r^2 - |clipped part|^2): equal in
        # exact arithmetic (|d| = r), but that difference cancels in float32 when the clipped
        # coordinates carry almost all of the norm, and would under-estimate the optimum
        free_before = torch.sqrt((free * free).sum(-1, keepdim=True) + EPS + trivial)
        free_after = torch.sqrt(torch.clamp(target ** 2 - norm_after ** 2, min=0) + EPS + trivial)
        d = after + (free_after / (free_before + EPS)) * free
    return (directions * d).sum(-1)


def exact_solver(directions, lower, upper, radius):
    """The exact optimum of every translation problem (see ``exact_solution``), [B, K]."""
    return exact_solution(directions, lower, upper, radius)[0]


def exact_solution(directions, lower, upper, radius):
    """The exact ``max <w, d>`` s.t. ``|d| <= radius``, ``lower <= d <= upper`` for every direction w.

    Shapes as in ``clip_and_rescale``; returns [B, K] in the directions' dtype (computed in float64).
    The optimum is ``d(lam) = clip(lam * w, lower, upper)`` at the smallest ``lam >= 0`` with
    ``|d(lam)| = radius`` (``|d(lam)|`` is non-decreasing), or the box corner ``lam -> inf`` when it
    lies inside the ball. Coordinate i reaches its bound at the breakpoint ``t_i = bound_i / w_i``;
    sorting the breakpoints gives ``|d(t)|^2`` at each of them by cumulative sums, the first one
    past ``radius^2`` brackets lam, and lam solves one quadratic there. Rows with w = 0 give 0.
    Differentiable (the sort and the bracket are piecewise constant). Returns (value [B, K] in the
    directions' dtype, lam [B, K, 1] in float64: inf where the corner fits).
    """
    w = directions.double()
    bound = torch.where(w > 0, upper.double(), lower.double()).expand_as(w)
    moving = w != 0
    t = torch.where(moving, bound / torch.where(moving, w, torch.ones_like(w)), torch.full_like(w, float('inf')))
    t, order = t.sort(dim=-1)
    w = w.gather(-1, order)
    bound = torch.where(torch.isinf(t), torch.zeros_like(t), bound.gather(-1, order))
    w2, c2, wc = w * w, bound * bound, w * bound
    clipped_before = c2.cumsum(-1) - c2                                  # sum over i < j of c_i^2
    free_from = w2.flip(-1).cumsum(-1).flip(-1)                          # sum over i >= j of w_i^2
    r2 = radius.double().view(-1, 1, 1) ** 2
    finite_t = torch.where(torch.isinf(t), torch.zeros_like(t), t)
    reaches = ~torch.isinf(t) & (clipped_before + finite_t * finite_t * free_from >= r2)
    inside = ~reaches.any(-1, keepdim=True)                              # the corner fits in the ball
    first = reaches.to(torch.int8).argmax(-1, keepdim=True)
    gained = (wc.cumsum(-1) - wc).gather(-1, first)                      # <w, d> of the clipped part
    rest = (r2 - clipped_before.gather(-1, first)).clamp(min=0)
    free = free_from.gather(-1, first)
    positive = (rest > 0) & (free > 0)
    lam = torch.where(positive, rest / torch.where(positive, free, torch.ones_like(free)), torch.zeros_like(free))
    lam = torch.where(lam > 0, lam, torch.ones_like(lam)).sqrt() * (lam > 0)
    value = torch.where(inside, wc.sum(-1, keepdim=True), gained + lam * free)
    lam = torch.where(inside, torch.full_like(lam, float('inf')), lam.detach())
    return value.squeeze(-1).to(directions.dtype), lam


UNIT_ROUNDOFF = 2.0 ** -53


def dual_bound(directions, lower, upper, radius, lam):
    """A rigorous upper bound [B, K] (float64) of ``max <w, d>`` s.t. ``|d|_2 <= radius``,
    ``lower <= d <= upper`` (``lower <= 0 <= upper``), by weak duality: for every ``mu >= 0``,

        max <w, d> <= mu r^2 / 2 + sum_i max_{l_i <= d_i <= u_i} (w_i d_i - mu d_i^2 / 2),

    since the added term ``mu (r^2 - |d|^2) / 2`` is >= 0 on the feasible set. With ``mu = 1 / lam``
    (``lam`` of ``exact_solution``; inf: mu = 0, the box corner) the bound equals the optimum. Each
    inner maximum of a concave quadratic is taken in closed form (``w_i^2 / (2 mu)`` where the
    unconstrained maximiser ``w_i / mu`` lies in the interval; that is its global maximum, an upper
    bound even where rounding misjudged the interval), the rounding of the float64 sums is covered
    by ``4 (h + 4) u`` times the sum of the absolute terms, and the result is rounded up. No
    square root of a difference: the cancellation of the primal formula does not enter.
    ``radius`` 0 or a zero direction gives 0."""
    w, low, high = directions.double(), lower.double(), upper.double()
    r = radius.double().view(-1, 1, 1)
    lam = lam.double()
    corner = torch.isinf(lam)
    safe_lam = torch.where(corner | (lam <= 0), torch.ones_like(lam), lam)
    mu = torch.where(corner, torch.zeros_like(lam), 1.0 / safe_lam)
    target = w * safe_lam
    d = torch.where(corner, torch.where(w > 0, high, low).expand_as(w), torch.minimum(torch.maximum(target, low), high))
    free = ~corner & (target >= low) & (target <= high)
    peak = 0.5 * w * w * safe_lam
    terms = torch.where(free, peak, w * d - 0.5 * mu * d * d)
    sizes = torch.where(free, peak, (w * d).abs() + 0.5 * mu * d * d)
    ball = 0.5 * mu.squeeze(-1) * r.squeeze(-1) ** 2
    value = ball + terms.sum(-1)
    slack = 4 * (w.size(-1) + 4) * UNIT_ROUNDOFF * (ball + sizes.sum(-1))
    bound = value + slack
    bound = torch.nextafter(bound, torch.full_like(bound, float('inf')))
    degenerate = (lam.squeeze(-1) <= 0) & ~corner.squeeze(-1)      # the exact solver found no free part
    bound = torch.where(degenerate, torch.full_like(bound, float('inf')), bound)
    # Cauchy-Schwarz, |w| r, is an upper bound too (it decides where r^2 underflows, say)
    schwarz = w.norm(dim=-1) * r.squeeze(-1) * (1 + 4 * (w.size(-1) + 4) * UNIT_ROUNDOFF)
    bound = torch.minimum(bound, torch.nextafter(schwarz, torch.full_like(schwarz, float('inf'))))
    trivial = (r.squeeze(-1) == 0) | (w == 0).all(-1)
    return torch.where(trivial, torch.zeros_like(bound), bound)


def solve(directions, lower, upper, radius, active, opt_iter, translation='iterative'):
    """The translation problems [B, K] by ``translation`` ('iterative': ``opt_iter`` rounds of
    clip-and-rescale; 'exact': ``exact_solver``). NaN entries are kept: the caller decides (the
    bound pass records them as not finite, then sets them to 0 for the training loss as the authors)."""
    if translation == 'iterative':
        return clip_and_rescale(directions, lower, upper, radius, active, opt_iter)
    if translation == 'exact':
        return exact_solver(directions, lower, upper, radius) * active.squeeze(-1)
    raise ValueError(f'translation must be one of {TRANSLATIONS}, not {translation!r}')


def relative_box(state):
    """The penultimate box relative to the ball's centre: (lower <= 0, upper >= 0), each [B, 1, h]."""
    lower = torch.clamp(state.lower - state.centre, max=0).unsqueeze(1)
    upper = torch.clamp(state.upper - state.centre, min=0).unsqueeze(1)
    return lower, upper


def label_translation(weight, y, state, radius, opt_iter, translation='iterative'):
    """``T[b, j] = max <W_j - W_y, d>`` over the ball-and-box set, for the true label only: [B, C]."""
    classes = weight.size(0)
    # the label rows by a one-hot product, not weight[y]: the backward of integer indexing
    # accumulates repeated labels in a thread-dependent order on CPU (training was not reproducible)
    label_rows = F.one_hot(y.long(), classes).to(weight.dtype) @ weight
    directions = weight.unsqueeze(0) - label_rows.unsqueeze(1)
    active = (torch.arange(classes, device=y.device) != y.unsqueeze(1)).to(weight.dtype).unsqueeze(-1)
    lower, upper = relative_box(state)
    return solve(directions, lower, upper, radius, active, opt_iter, translation)


def pairwise_translation(weight, state, radius, opt_iter, translation='iterative'):
    """All pairs: ``T[b, i, j] = max <W_i - W_j, d>``, [B, C, C] (the authors' layout, C times the work)."""
    batch, classes = state.centre.size(0), weight.size(0)
    directions = (weight.unsqueeze(1) - weight.unsqueeze(0)).flatten(0, 1).unsqueeze(0).expand(batch, -1, -1)
    active = (1.0 - torch.eye(classes, device=weight.device, dtype=weight.dtype)).view(1, -1, 1)
    lower, upper = relative_box(state)
    t = solve(directions, lower, upper, radius, active.expand(batch, -1, -1), opt_iter, translation)
    return t.view(batch, classes, classes)


def label_column(weight, y, state, radius, opt_iter, *, layout='label', translation='iterative'):
    """``T[:, j, y]`` [B, C] in ``layout`` ('label' solves only that column, 'pairwise' the whole
    table) with ``translation``'s solver."""
    if layout == 'label':
        return label_translation(weight, y, state, radius, opt_iter, translation)
    if layout == 'pairwise':
        table = pairwise_translation(weight, state, radius, opt_iter, translation)
        return table.gather(2, y.view(-1, 1, 1).expand(-1, table.size(1), 1)).squeeze(2)
    raise ValueError(f'layout must be one of {LAYOUTS}, not {layout!r}')


def translate(logits, y, column, gloro=False):
    """Worst-case logits ``z_j + T[j, y]`` (j != y), or GloRo's ``[z, max_{j!=y} z~_j]``."""
    off = torch.ones_like(logits).scatter_(1, y.unsqueeze(1), 0.0)
    worst = logits + column * off
    if not gloro:
        return worst
    bottom = worst.masked_fill(off == 0, float('-inf')).max(dim=1, keepdim=True).values
    return torch.cat([logits, bottom], dim=1)
