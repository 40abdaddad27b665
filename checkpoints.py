"""Checkpoint files: atomic writes that refuse NaN/inf, reading ours and the authors' formats, loading
weights into a model with one-line errors."""
import os

import torch

import models


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or does not fit the requested model (one-line message)."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN or inf (one-line message naming where)."""


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a torn checkpoint.

    Refuses (NonFiniteError, nothing written) an object holding a NaN or inf tensor.
    """
    bad = first_non_finite(obj)
    if bad is not None:
        raise NonFiniteError(f'not writing {path}: {bad} holds NaN or inf values')
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_state(path, map_location='cpu'):
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f'cannot read checkpoint {path}: {error}') from error


def load_weights(model, state_dict, path, model_name):
    """Load ``state_dict`` into ``model``; a mismatch is a CheckpointError naming the problem."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}'
              for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        detail = '; '.join(filter(None, [
            f'missing {missing[:4]}' if missing else '',
            f'unexpected {unexpected[:4]}' if unexpected else '',
            f'shape mismatch {shapes[:3]}' if shapes else '']))
        raise CheckpointError(f'{path} does not fit --model {model_name}: {detail}')
    bad = first_non_finite(state_dict)
    if bad is not None:
        raise CheckpointError(f'{path}: tensor {bad} holds NaN or inf values; refusing to load it')
    model.load_state_dict(state_dict)


def first_non_finite(tensors):
    """Name of the first floating tensor of a (nested) dict/list holding NaN or inf, else None."""
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    for name, value in items:
        if torch.is_tensor(value):
            if value.is_floating_point() and not torch.isfinite(value).all():
                return str(name)
        elif isinstance(value, (dict, list, tuple)):
            inner = first_non_finite(value)
            if inner is not None:
                return f'{name}.{inner}'
    return None


def load_model(path, data, model_name, init=1.0, device='cpu'):
    """A model of docs/method.md §1 with the weights of checkpoint ``path`` (ours or the authors'):
    the file itself or, like ``--saved_model``, its prefix without ``_best.pth`` (``checkpoint_path``)."""
    path = checkpoint_path(path)
    state = load_state(path)
    weights = state.get('state_dict', state) if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise CheckpointError(f'{path} holds no state_dict')
    weights = {k.removeprefix('module.'): v for k, v in weights.items()}
    model = models.select_model(data, model_name, init, device)
    load_weights(model, weights, path, model_name)
    return model, state


def checkpoint_path(saved_model):
    """The checkpoint file a path names, in either form every script and ``load_model`` accept:
    a file (``pretrained/x_best.pth``, or any existing file) as it is, else a prefix
    (``pretrained/x``) plus ``_best.pth``."""
    saved_model = os.fspath(saved_model)
    if saved_model.endswith('.pth') or os.path.isfile(saved_model):
        return saved_model
    return saved_model + '_best.pth'
