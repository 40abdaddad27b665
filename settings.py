"""How a bound pass computes its norms and worst-case logits: one frozen, validated settings object.

``BoundSettings`` carries every option of the bound pass (``local_bound.bound_outputs``); the
named presets are the ones the scripts use:

* ``CERTIFIED`` (the default of every reported certificate): guaranteed norms. Every norm that a
  certificate multiplies or sizes a box with is an upper bound, exact or probabilistic, and the
  certificate fails with probability at most ``failure_prob`` (docs/certificates.md). Its start
  vectors come from a secret seed drawn per call (``seed=None``); ``replace(seed=...)`` repeats.
* ``LANCZOS``: Lanczos with per-sample stopping and the exact last layer. An estimate: fast and
  usually converged, but no bound on how often it under-estimates a norm.
* ``AUTHORS``: the authors' evaluation (2000 power iterations, 1000 rounds of clip-and-rescale).
  An estimate, kept for fidelity comparisons.
* ``TRAINING``: the authors' training pass (warm power iteration, clip-and-rescale); its sniter
  and opt_iter come from the flags.
"""
import math
import numbers
import secrets
from dataclasses import dataclass, replace
from typing import Optional

METHODS = ('guaranteed', 'lanczos', 'power', 'precise')
TRANSLATIONS = ('iterative', 'exact')
LAYOUTS = ('label', 'pairwise')
BOUNDS = ('local', 'refined', 'global')
REFINEMENTS = ('rows', 'radius')
POWER_GRADS = ('unrolled', 'final')


class BoundError(ValueError):
    """A model or input the bound pass cannot handle (one-line message)."""


@dataclass(frozen=True)
class BoundSettings:
    """Options of one bound pass (validated on construction).

    method: per-sample masked norms: 'guaranteed' (upper bounds, see ``guaranteed.py``), 'lanczos'
        or 'power' (estimates from below), 'precise' (float64, converged: audits).
    sniter: most operator applications per norm (power rounds or Lanczos steps).
    tol: the estimate methods' stopping tolerance (None: their default).
    translation / opt_iter / layout: the last-layer solver (``last_layer.py``); guaranteed settings
        require 'exact' (the iterative solver is an estimate, not an upper bound).
    bound: 'local' (the paper's: masked norms), 'refined' (masked norms, and each layer's ball
        sized by them; docs/method.md §7) or 'global' (plain norms).
    refinements: with bound='refined', which of its two refinements apply: 'rows' (masked row
        norms for the ball's box) and 'radius' (the ball's radius follows the local product).
    gloro: GloRo's extra bottom logit. sp_thres: TinyImageNet's sparsity term (None: skip).
    power_grad: how gradients pass the training power iterations ('unrolled' or 'final').
    failure_prob: with 'guaranteed', the probability that a certificate rests on a norm that is
        not an upper bound (a union over every norm and check it uses).
    seed: seeds the fresh start vectors of the guaranteed norms: an integer in [0, 2**63) repeats
        a run's decisions; None (the default) draws a secret seed from the OS at every call
        (``secret_seed``), so that nobody who built the model can have known the starts
        (docs/certificates.md, "What an adversary who reads the code cannot do").
    global_steps: Lanczos steps of a guaranteed global norm too large to form explicitly.
    exact_below: with 'guaranteed', a layer whose matrix has at most this many entries gets the
        exact SVD of its explicit masked matrix (float64) instead of a probabilistic bound.
    """
    method: str = 'guaranteed'
    sniter: int = 2000
    tol: Optional[float] = None
    translation: str = 'exact'
    opt_iter: int = 1000
    layout: str = 'label'
    bound: str = 'local'
    refinements: tuple = REFINEMENTS
    gloro: bool = False
    sp_thres: Optional[float] = None
    power_grad: str = 'unrolled'
    failure_prob: float = 1e-9
    seed: Optional[int] = None
    global_steps: int = 512
    exact_below: int = 4096

    def __post_init__(self):
        for name, allowed in (('method', METHODS), ('translation', TRANSLATIONS), ('layout', LAYOUTS),
                              ('bound', BOUNDS), ('power_grad', POWER_GRADS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f'{name} must be one of {allowed}, not {getattr(self, name)!r}')
        if not self.refinements or set(self.refinements) - set(REFINEMENTS):
            raise ValueError(f'refinements must be a non-empty subset of {REFINEMENTS}, not {self.refinements!r}')
        for name in ('sniter', 'opt_iter', 'global_steps'):
            if int(getattr(self, name)) < 1:
                raise ValueError(f'{name} must be at least 1, not {getattr(self, name)}')
        if not (0 < self.failure_prob < 1) or not math.isfinite(self.failure_prob):
            raise ValueError(f'failure_prob must lie in (0, 1), not {self.failure_prob}')
        if self.power_grad == 'final' and self.method != 'power':
            raise ValueError("power_grad='final' applies to power iteration only (method='power')")
        if self.tol is not None and not (self.tol > 0):
            raise ValueError(f'tol must be positive, not {self.tol}')
        if self.guaranteed and self.translation != 'exact':
            raise ValueError("guaranteed certificates use the exact last layer (translation='exact'): the "
                             "iterative clip-and-rescale is an estimate, kept for training and the estimate presets")
        if self.seed is not None and not (isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool)
                                          and 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f'seed must be None (a secret seed per call) or an integer in [0, 2**63), '
                             f'not {self.seed!r}')

    @property
    def guaranteed(self):
        """True when the certificates of these settings rest on upper bounds."""
        return self.method == 'guaranteed'

    @property
    def refines(self):
        """The refinements in force: a subset of REFINEMENTS (empty unless bound='refined')."""
        return frozenset(self.refinements) if self.bound == 'refined' else frozenset()

    def replace(self, **changes):
        """A copy with ``changes`` (validated again)."""
        return replace(self, **changes)

    def seeded(self):
        """These settings with a seed: their own, or a secret one drawn now (``secret_seed``)."""
        return self if self.seed is not None else replace(self, seed=secret_seed())

    def describe(self):
        """One line for the logs: what a certificate of these settings promises."""
        bound = '' if self.bound == 'local' else f'{self.bound} bound, '
        if self.guaranteed:
            seed = 'a secret seed per call' if self.seed is None else f'seed {self.seed}'
            return (f'{bound}guaranteed norms (upper bounds; a certificate fails with probability at most '
                    f'{self.failure_prob:g}), exact last layer checked by duality, float64 pass with outward '
                    f'rounding, at most {self.sniter} Lanczos steps per norm, start vectors from {seed}')
        return (f'{bound}estimate ({self.method}, {self.sniter} iterations, {self.translation} last layer): '
                'norms approach from below, no guarantee')


SEED_LIMIT = 2**63


def secret_seed():
    """A seed drawn from the OS's secret source (``secrets``): 63 bits nobody can predict."""
    return secrets.randbits(63)


CERTIFIED = BoundSettings()
LANCZOS = BoundSettings(method='lanczos')
AUTHORS = BoundSettings(method='power', translation='iterative')
TRAINING = BoundSettings(method='power', sniter=1, translation='iterative', opt_iter=1)
PRESETS = {'guaranteed': CERTIFIED, 'lanczos': LANCZOS, 'authors': AUTHORS}


def checked_settings(settings):
    """``settings`` with a seed (``BoundSettings.seeded``: a secret one drawn now when it has none)."""
    if not isinstance(settings, BoundSettings):
        raise TypeError(f'expected a settings.BoundSettings, not {type(settings).__name__}')
    return settings.seeded()
