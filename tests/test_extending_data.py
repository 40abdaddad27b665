"""README's Extending section for a data set, followed literally: a toy data set and a model for it,
declared with one call each, train, certify and evaluate through the real entry points."""
import functools

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import data_load
import evaluate
import models
import trainer
import utils


def toy_sets(data_dir, augmentation, normalization, download):
    """Two separable classes of 4x4 one-channel images."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (96,), generator=gen)
    x = (0.3 + 0.4 * y.view(-1, 1, 1, 1) + 0.05 * torch.randn(96, 1, 4, 4, generator=gen)).clamp(0, 1)
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


@pytest.fixture
def toy_registered():
    data_load.register_dataset(data_load.DatasetSpec('toy', (1, 4, 4), 2, toy_sets, paper_radii=(0.05,),
                                                     lip_eps=0.01))
    models.register_model('toy', 'mlp', lambda init: nn.Sequential(
        nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2)))
    yield
    del data_load.DATASETS['toy'], models.MODELS[('toy', 'mlp')]


def test_a_registered_data_set_trains_and_certifies(toy_registered, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ['--epochs', '8', '--rampup', '2', '--warmup', '0', '--epsilon', '0.05', '--epsilon_train', '0.05',
            '--batch_size', '16', '--test_batch_size', '32', '--workers', '0', '--niter', '5', '--prefix', 'toy',
            '--verbose', '0', '--device', 'cpu', '--lr', '0.03', '--test_sniter', '50']
    parse = functools.partial(utils.argparser, argv=argv, data='toy', model='mlp')
    torch.manual_seed(0)
    report = trainer.main(parse)
    assert report['clean_err'] < 0.2 and report['certified_err'] < 1.0
    result = evaluate.main(['--data', 'toy', '--model', 'mlp', '--saved_model', 'pretrained/toy_mlp',
                            '--epsilon', '0.05', '--no_pgd', '--workers', '0', '--device', 'cpu', '--radius',
                            '--empirical_lip'])
    assert result['certified_err'] == pytest.approx(report['certified_err'])
    assert set(result['radius']['accuracy']) == {0.05}
