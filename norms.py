"""Vector norms by name, declared once: what every script and module accepts as a norm, and the
per-sample norm of a batch."""
import math

NAMES = {'1': 1.0, 'l1': 1.0, '2': 2.0, '2.0': 2.0, 'l2': 2.0, 'inf': math.inf, 'linf': math.inf}


def order(norm, allowed=(1.0, 2.0, math.inf)):
    """The p of ``norm`` (1, 2, inf, or a name of ``NAMES``) as a float, if ``allowed``; ValueError otherwise."""
    p = NAMES.get(norm.lower()) if isinstance(norm, str) else norm
    if isinstance(p, bool) or p not in allowed:
        names = ', '.join('inf' if math.isinf(a) else f'{a:g}' for a in allowed)
        raise ValueError(f'norm must be one of {names}, not {norm!r}')
    return float(p)


def batch_norms(t, p=2.0):
    """Per-sample L-p norm of ``t`` (p = 1, 2 or inf), shaped to broadcast against it."""
    values = t.flatten(1).norm(p=p, dim=1) if p != math.inf else t.flatten(1).abs().amax(dim=1)
    return values.view(-1, *([1] * (t.dim() - 1)))
