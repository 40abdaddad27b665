"""The original ``--model`` grammar: ``[AUG-]LOSS-tor-ARCH[-HYPER]`` (docs/method_lolip.md §1).

LOSS must contain ``ce``; the objective is chosen by substring, first match wins:
trades, tulip, llr, advbeta, adv, else natural. Its modifiers (betas, lambdas, steps) live in LOSS.
"""
import re
from dataclasses import dataclass, field

GRAMMAR = ('[AUG-]LOSS-tor-ARCH[-HYPER], e.g. ce-tor-CNN001, strades6ce-tor-WRN_40_10, '
           'advce-tor-ResNet50-adambs128 (AUG: aug01; LOSS contains ce; ARCH: '
           '{archs}; HYPER: adam|nadam, lrem1..lrem4, bs16|bs32|bs128|bs256, epN, mo.9|mo0, wd.9)')
ARCHS = ('CNN001', 'CNN002', 'WRN_40_10', 'WRN_40_10_drop20', 'WRN_40_10_drop50', 'ResNet50',
         'ResNet50_drop20', 'ResNet50_drop50', 'ResNet152')
AUGS = ('aug01',)
OBJECTIVE_ORDER = ('trades', 'tulip', 'llr', 'advbeta', 'adv')
HYPER_TOKEN = re.compile(r'adam|nadam|lrem[1-4]|bs(?:256|128|32|16)|ep\d+|mo\.9|mo0|wd\.9')


class GrammarError(ValueError):
    """A --model string outside the grammar; the message names the grammar."""


@dataclass
class ModelSpec:
    """A parsed --model string: augmentation, objective and its parameters, arch, hyper tokens."""
    name: str
    aug: str | None
    loss: str
    objective: str
    params: dict
    arch: str
    hyper: dict = field(default_factory=dict)


def _first(loss, table, default):
    """The value of the first key of ``table`` (in order) that is a substring of ``loss``."""
    return next((value for key, value in table if key in loss), default)


def objective_params(loss):
    """(objective name, its parameters) from the LOSS token, as the original's substring tests."""
    objective = next((name for name in OBJECTIVE_ORDER if name in loss), 'natural')
    if objective == 'trades':
        beta = _first(loss, [('trades10', 10.0), ('trades20', 20.0), ('trades6', 6.0),
                             ('trades3', 3.0), ('trades.5', 0.5)], 1.0)
        return objective, dict(beta=beta, steps=20 if 'K20' in loss else 10,
                               summed='strades' in loss)
    if objective == 'tulip':
        lam = _first(loss, [('tulipem1', 0.1), ('tulipem2', 0.01), ('tulip0', 0.0)], 1.0)
        step = _first(loss, [('ssem1', 0.1), ('ssem2', 0.01), ('ssem3', 0.001)], 1.0)
        return objective, dict(lam=lam, step=step)
    if objective == 'llr':
        lam, mu = _first(loss, [('llr65', (6.0, 5.0)), ('llr36', (3.0, 6.0))], (4.0, 3.0))
        return objective, dict(lam=lam, mu=mu, summed='sllr' in loss)
    if objective == 'advbeta':
        beta = _first(loss, [('beta.5', 0.5), ('beta8', 8.0), ('beta4', 4.0), ('beta2', 2.0)], 1.0)
        return objective, dict(beta=beta)
    return objective, {}


def parse_hyper(token):
    """HYPER tokens (concatenable, e.g. ``adamlrem2ep70``) as a dict; GrammarError if any is left."""
    if HYPER_TOKEN.sub('', token):
        raise GrammarError(f'unknown HYPER {token!r} in --model; grammar: '
                           + GRAMMAR.format(archs='|'.join(ARCHS)))
    hyper = {}
    for match in HYPER_TOKEN.findall(token):
        if match in ('adam', 'nadam'):
            hyper['optimizer'] = match
        elif match.startswith('lrem'):
            hyper['lr'] = 10.0 ** -int(match[4:])
        elif match.startswith('bs'):
            hyper['batch_size'] = int(match[2:])
        elif match.startswith('ep'):
            hyper['epochs'] = int(match[2:])
        elif match.startswith('mo'):
            hyper['momentum'] = 0.9 if match == 'mo.9' else 0.0
        else:
            hyper['weight_decay'] = 0.9
    return hyper


def parse_model(name):
    """ModelSpec of a --model string; GrammarError naming the grammar when it does not match."""
    error = GrammarError(f'--model {name!r} does not match the grammar '
                         + GRAMMAR.format(archs='|'.join(ARCHS)))
    parts = name.split('-')
    aug = parts.pop(0) if parts and parts[0] in AUGS else None
    if len(parts) not in (3, 4) or parts[1] != 'tor' or 'ce' not in parts[0] or parts[2] not in ARCHS:
        raise error
    objective, params = objective_params(parts[0])
    hyper = parse_hyper(parts[3]) if len(parts) == 4 else {}
    return ModelSpec(name, aug, parts[0], objective, params, parts[2], hyper)
