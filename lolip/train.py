"""The training loop of the original: summed losses, per-epoch test pass (batch 32), lr milestones,
tqdm bars, a checkpoint written atomically after every epoch and ``resume`` from it.
"""
import random

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoints
from local_bound import correct_predictions


TEST_BATCH = 32


def seed_everything(seed):
    """Seeds Python, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_epoch(model, loader, objective, optimizer, device, desc):
    """One pass over ``loader``; returns (summed loss / N, accuracy of the objective's logits)."""
    total = correct = count = 0
    for x, y in tqdm(loader, desc=desc, leave=False):
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss, logits = objective(model, x, y)
        loss.backward()
        optimizer.step()
        total += loss.item()
        correct += int(correct_predictions(logits, y).sum())
        count += len(y)
    return total / max(count, 1), correct / max(count, 1)


@torch.no_grad()
def test_epoch(model, dataset, device):
    """(summed CE / N, accuracy) on ``dataset`` in eval mode."""
    model.eval()
    total = correct = count = 0
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=TEST_BATCH):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total += F.cross_entropy(logits, y, reduction='sum').item()
        correct += int(correct_predictions(logits, y).sum())
        count += len(y)
    return total / max(count, 1), correct / max(count, 1)


def _rng_state():
    return {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(),
            'python': random.getstate(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state):
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if state['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def save_checkpoint(path, model, optimizer, scheduler, epoch, history, meta):
    """Everything ``resume`` needs, written atomically."""
    checkpoints.atomic_save({'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
                         'scheduler': scheduler.state_dict(), 'epoch': epoch, 'history': history,
                         'rng': _rng_state(), **meta}, path)


def load_checkpoint(path, model, optimizer, scheduler, meta):
    """(epochs done, history) from ``path``; CheckpointError when it is another run's."""
    state = checkpoints.load_state(path)
    for key, value in meta.items():
        if state.get(key) != value:
            raise checkpoints.CheckpointError(f'{path} is a checkpoint of {key} {state.get(key)!r}, '
                                          f'not {value!r}; remove it or drop --resume')
    model.load_state_dict(state['state_dict'])
    optimizer.load_state_dict(state['optimizer'])
    scheduler.load_state_dict(state['scheduler'])
    _set_rng_state(state['rng'])
    return state['epoch'], state['history']


def fit(model, data, objective, optimizer, scheduler, *, epochs, batch_size, device,
        checkpoint, meta, resume=False, log=print):
    """Trains for ``epochs`` (continuing a checkpoint with ``resume``); returns the history."""
    done, history = 0, []
    if resume:
        done, history = load_checkpoint(checkpoint, model, optimizer, scheduler, meta)
        log(f'resumed from {checkpoint} after epoch {done}')
    loader = torch.utils.data.DataLoader(data.train, batch_size=batch_size, shuffle=True)
    for epoch in range(done + 1, epochs + 1):
        lr = optimizer.param_groups[0]['lr']
        train_loss, train_acc = train_epoch(model, loader, objective, optimizer, device,
                                            f'epoch {epoch}/{epochs}')
        scheduler.step()
        test_loss, test_acc = test_epoch(model, data.test, device)
        history.append({'epoch': epoch, 'lr': lr, 'trn_loss': train_loss, 'trn_acc': train_acc,
                        'tst_loss': test_loss, 'tst_acc': test_acc})
        log(f'epoch {epoch}/{epochs} lr {lr:g} train loss {train_loss:.4f} acc {train_acc:.4f} '
            f'test loss {test_loss:.4f} acc {test_acc:.4f}')
        save_checkpoint(checkpoint, model, optimizer, scheduler, epoch, history, meta)
    return history
