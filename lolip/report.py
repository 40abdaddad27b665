"""What a run reports (docs/method_lolip.md §1): clean and adversarial accuracy on train and test,
empirical local Lipschitzness on train and test in both directions (``lip_max``: the definition's
maximisation; ``lip_as_published``: the original code's descent), and the generalisation gaps.
"""
import json
import os

import torch
from tqdm import tqdm

import empirical
from local_bound import correct_predictions

EVAL_BATCH = 128  # eval mode, seeded noise stream: per-example results do not depend on the batch (the original: 16)
ROWS = (('clean accuracy', 'acc'), ('adversarial accuracy', 'adv_acc'),
        ('local Lipschitzness (max, the definition)', 'lip_max'),
        ('local Lipschitzness (as published, a descent)', 'lip_as_published'))


def loader(dataset, batch_size=EVAL_BATCH):
    """An ordered loader of (x, y) batches."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def accuracies(model, batches, attack, device, desc):
    """(clean accuracy, accuracy under ``attack``) over ``batches``, model in eval mode (a tie or NaN
    never counts as correct, as everywhere in the repository)."""
    model.eval()
    clean = robust = count = 0
    for x, y in tqdm(batches, desc=desc, leave=False):
        x, y = x.to(device), y.to(device)
        x_adv = attack(model, x, y)
        with torch.no_grad():
            clean += int(correct_predictions(model(x), y).sum())
            robust += int(correct_predictions(model(x_adv), y).sum())
        count += len(y)
    return clean / max(count, 1), robust / max(count, 1)


def split_figures(model, dataset, attack, eps, norm, device, name, seed=0):
    """{'acc', 'adv_acc', 'lip_max', 'lip_as_published'} of one split (the searches' start noise
    seeded by ``seed``: ``empirical.published_noise``)."""
    clean, robust = accuracies(model, loader(dataset), attack, device, f'{name} accuracy')
    lip = empirical.dataset_lipschitzness(model, loader(dataset), eps, norm=norm, device=device, seed=seed)
    return {'acc': clean, 'adv_acc': robust, 'lip_max': lip['lip_max'],
            'lip_as_published': lip['lip_as_published']}


def evaluate(model, train_set, test_set, attack, eps, norm, device, seed=0):
    """The report's figures, flat: train_acc, test_acc, adv_train_acc, ..., gap_acc, gap_adv_acc."""
    figures = {}
    for split, dataset in (('train', train_set), ('test', test_set)):
        for key, value in split_figures(model, dataset, attack, eps, norm, device, split, seed).items():
            figures[_key(key, split)] = value
    figures['gap_acc'] = figures['train_acc'] - figures['test_acc']
    figures['gap_adv_acc'] = figures['adv_train_acc'] - figures['adv_test_acc']
    return figures


def _key(metric, split):
    """'adv_acc', 'train' -> 'adv_train_acc'; 'lip_max', 'test' -> 'test_lip_max'."""
    if metric == 'adv_acc':
        return f'adv_{split}_acc'
    return f'{split}_{metric}'


def table(figures):
    """The printed table: one row per measure, columns train / test / gap (train - test)."""
    lines = [f"{'':48s} {'train':>10s} {'test':>10s} {'gap':>10s}"]
    for label, metric in ROWS:
        train, test = figures[_key(metric, 'train')], figures[_key(metric, 'test')]
        lines.append(f'{label:48s} {train:10.4f} {test:10.4f} {train - test:10.4f}')
    return '\n'.join(lines)


def write_json(result, path):
    """Writes ``result`` to ``path`` atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as handle:
        json.dump(result, handle, indent=2, sort_keys=True)
    os.replace(tmp, path)
