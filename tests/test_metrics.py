"""Per-epoch metrics CSV: one row per epoch through a run that is interrupted twice and resumed."""
import csv
import functools
import math

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import trainer
import utils


class InterruptAfter(Dataset):
    """Random digits; reading item number ``stop`` raises KeyboardInterrupt (Ctrl-C mid-epoch)."""

    def __init__(self, images, labels, stop):
        self.images, self.labels, self.stop, self.served = images, labels, stop, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        self.served += 1
        if self.served == self.stop:
            raise KeyboardInterrupt
        return self.images[index], int(self.labels[index])


def _parse(argv):
    return functools.partial(utils.argparser, argv=argv, data='mnist', model='relux', epochs=5, warmup=1,
                             rampup=2, epsilon=1.58, epsilon_train=1.58)


def test_metrics_have_one_row_per_epoch_after_a_run_and_two_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    images, labels = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    test = TensorDataset(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    argv = ['--batch_size', '16', '--test_sniter', '3', '--test_opt_iter', '3', '--niter', '2', '--workers', '0',
            '--prefix', 'm', '--verbose', '0', '--device', 'cpu', '--sniter', '1', '--opt_iter', '1']
    for stop in (32 * 2 + 5, 32 * 2 + 20):      # Ctrl-C during epoch 2, then again in epoch 3's run
        with pytest.raises(SystemExit) as info:
            trainer.main(_parse(argv + (['--resume'] if stop != 69 else [])),
                         InterruptAfter(images, labels, stop), test)
        assert info.value.code == 130
    trainer.main(_parse(argv + ['--resume']), TensorDataset(images, labels), test)
    with open(tmp_path / 'pretrained' / 'm_relux_metrics.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['epoch']) for r in rows] == [0, 1, 2, 3, 4]
    varying = [c for c in rows[0] if c.startswith('varying_')]
    assert varying == [f'varying_{i}' for i in (1, 3, 5, 7, 10, 12)]
    assert rows[0]['lip_local_median'] == '' and rows[0]['test_cert_err'] == ''   # warm-up epoch
    for row in rows[1:]:
        assert 0 < float(row['lip_local_median']) <= float(row['lip_global']) * (1 + 1e-4)
        assert row['lip_ratio_median'] == ''          # only with --tightness N
        assert all(0 <= float(row[c]) <= 1 for c in varying)
        assert math.isfinite(float(row['robust_loss'])) and 0 <= float(row['test_cert_err']) <= 1
    assert float(rows[1]['eps']) == 0.0 and float(rows[2]['eps']) == pytest.approx(1.58)


def test_converged_ratios_are_local_over_global_by_explicit_svds():
    """The --tightness ratios (converged local over converged global) against products of the top
    singular values of the explicit (masked) matrices, on the first 5 examples of a loader."""
    from types import SimpleNamespace

    import evaluation
    from helpers import affine_layers, explicit_matrix, masked_matrix, propagate_records, small_conv_net
    model = small_conv_net('relux', seed=3).float()
    x = torch.rand(8, 2, 7, 7)
    loader = torch.utils.data.DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long), torch.arange(8)),
                                         batch_size=3)
    args = SimpleNamespace(bound='local', seed=0)
    ratios = evaluation.converged_ratios(model, loader, args, SimpleNamespace(device='cpu'), 0.3, 5)
    matrices = [explicit_matrix(layer, shape).double() for layer, shape in affine_layers(model, (2, 7, 7))]
    glob = math.prod(float(torch.linalg.svdvals(m)[0]) for m in matrices)
    records = propagate_records(model, x[:5], 0.3)
    expected = [math.prod(float(torch.linalg.svdvals(masked_matrix(m, rec.in_mask[i] if rec.in_mask is not None else None,
                                                                   rec.out_mask[i]))[0])
                          for m, rec in zip(matrices, records)) / glob for i in range(5)]
    assert ratios.tolist() == pytest.approx(expected, rel=1e-4)
    assert (ratios < 1).all()
