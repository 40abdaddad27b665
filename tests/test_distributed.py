"""torch.distributed training and evaluation on CPU (gloo): 2 processes launched by torchrun.

The 2-process runs go through the real command lines (train_mnist.py, evaluate.py) on a small
synthetic MNIST folder; a launcher (helpers.launch) records, per rank, the files the process opened for writing
and its final parameters; the trainings run in float64 (see TOLERANCE). About two minutes on 2 cores.
"""
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import evaluation
import local_bound
import ranks
import trainer
import utils
from helpers import fake_mnist, launch, multi_process, store_lines


def epoch_lines(log):
    """[(loss, robust loss, test err, certified err)] of the epoch lines of a train log."""
    pattern = (r'epoch +\d+ .*\| loss ([\d.]+) .*robust loss ([\d.]+) .*test err ([\d.]+) '
               r'certified err ([\d.]+)')
    return [tuple(map(float, m)) for m in re.findall(pattern, log)]


TRAIN_FLAGS = ['--epochs', '3', '--rampup', '1', '--test_batch_size', '8', '--workers', '0',
               '--test_sniter', '3', '--test_opt_iter', '3', '--niter', '2', '--no_shuffle',
               '--epsilon', '0.5', '--epsilon_train', '0.5', '--lr', '3e-3', '--verbose', '1']
LR, STEPS = 3e-3, 6          # 3 epochs of 32 training images in batches of 16

# The two-rank runs are compared with one process in float64 (parameters, start vectors, stores
# and batches; the code is the same). Why, and the tolerance:
# * Both compute the same real numbers (the same 16 examples per step, the same start vectors, the
#   mean gradient); only the order of the sums differs (one mean over 16 examples against two means
#   over 8 averaged by the all-reduce; kernels blocked for another batch size). A reordered sum of
#   n terms moves by about sqrt(n) u sum|terms| (u the unit roundoff).
# * Adam divides the gradient by sqrt(v) + 1e-8, so on an element whose gradient is near zero an
#   absolute gradient change d becomes a step change of up to lr d / 1e-8. In float32 (u = 6e-8)
#   that makes rounding noise a full step (lr) of either sign on a few elements: the old float32
#   comparison differed by up to 1e-4 on 1 to 6 of the 5120 weights of the last layer and failed
#   on a fresh install. In float64 (u = 1.1e-16), with n <= 16 * 28 * 28 terms of sum|terms| <= 1
#   (mean gradients of a cross-entropy through layers of norm about 1), a step changes by at most
#   lr * 1.1e-16 * 112 / 1e-8 ~ 1.2e-6 lr, and 6 steps by under 1e-5 lr.
# * A discrete decision (a ReLU or varying-set mask, a sign) flips only on a value within about
#   1e-14 relative of its threshold: with about 1e7 such decisions in the run, a chance near 1e-7.
# So no parameter may differ by more than TOLERANCE = 1e-4 lr, ten times that bound, while a real
# divergence moves parameters by Adam steps (about lr): a rank that skips the all-reduce or
# trains on the wrong share differs by 3e-2, an all-reduce that sums instead of averaging by 1e-2
# (tests below). Measured here: 2e-13.
TOLERANCE = 1e-4 * LR
FLOAT64 = textwrap.dedent('''
    import torch, data_load, trainer
    torch.set_default_dtype(torch.float64)
    trainer.store_dtype = lambda args, runtime: torch.float64
    _batch = data_load.DeviceTensorLoader._batch
    data_load.DeviceTensorLoader._batch = lambda self, index: tuple(
        t.double() if t.is_floating_point() else t for t in _batch(self, index))
''')
# A real divergence of the ranks from one process: the all-reduce sums the ranks' gradients
# instead of averaging them (the ranks stay identical to each other).
SUMMED_ALLREDUCE = textwrap.dedent('''
    import trainer, torch.distributed as dist
    _ddp = trainer.DistributedDataParallel

    def summing_ddp(net, **options):
        net = _ddp(net, **options)
        net.register_comm_hook(None, lambda state, bucket: dist.all_reduce(
            bucket.buffer(), async_op=True).get_future().then(lambda future: future.value()[0]))
        return net
    trainer.DistributedDataParallel = summing_ddp
''')


def train_flags(tmp):
    return TRAIN_FLAGS + ['--data_dir', str(tmp / 'data'), '--prefix', 'run']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """The same MNIST training (float64) with one process (batch 16) and with two (batch 8 each)."""
    tmp = tmp_path_factory.mktemp('dist')
    fake_mnist(tmp / 'data')
    one = launch(tmp, 'one', 'train_mnist.py', train_flags(tmp) + ['--batch_size', '16'], prelude=FLOAT64)
    two = launch(tmp, 'two', 'train_mnist.py', train_flags(tmp) + ['--batch_size', '8'], nproc=2,
                 prelude=FLOAT64)
    return tmp, one, two


def parameter_gaps(audit_one, audit_two):
    """(largest |rank 0 - rank 1|, largest |rank 0 - one process|) over every parameter."""
    rank0, rank1 = (torch.load(audit_two / f'params_rank{r}.pt') for r in (0, 1))
    single = torch.load(audit_one / 'params_rank0.pt')
    assert rank0.keys() == single.keys() and all(v.dtype == torch.float64 for v in single.values())
    return (max(float((rank0[k] - rank1[k]).abs().max()) for k in single),
            max(float((rank0[k] - single[k]).abs().max()) for k in single))


@multi_process
def test_two_ranks_keep_identical_parameters_close_to_one_process(runs):
    _, (_, _, audit_one), (_, _, audit_two) = runs
    between_ranks, to_one = parameter_gaps(audit_one, audit_two)
    assert between_ranks == 0
    assert to_one <= TOLERANCE


@multi_process
def test_the_tolerance_catches_an_allreduce_that_sums(runs):
    tmp, (_, _, audit_one), _ = runs
    _, _, audit = launch(tmp, 'summed', 'train_mnist.py', train_flags(tmp) + ['--batch_size', '8'], nproc=2,
                         prelude=FLOAT64 + SUMMED_ALLREDUCE)
    between_ranks, to_one = parameter_gaps(audit_one, audit)
    assert between_ranks == 0 and to_one > 100 * TOLERANCE


@multi_process
def test_two_ranks_log_the_losses_of_one_process(runs):
    _, (_, run_one, _), (_, run_two, _) = runs
    one = epoch_lines((run_one / 'pretrained' / 'run_relux_train.log').read_text())
    two = epoch_lines((run_two / 'pretrained' / 'run_relux_train.log').read_text())
    assert len(one) == len(two) == 3
    # printed to 4 decimals: values that agree to 1e-9 print at most one unit of the last digit apart
    np.testing.assert_allclose(two, one, rtol=0, atol=1.001e-4)


@multi_process
def test_only_rank_zero_writes_files(runs):
    _, _, (_, run, audit) = runs
    assert (audit / 'writes_rank1.txt').read_text() == ''
    written = {Path(p).name for p in (audit / 'writes_rank0.txt').read_text().split()}
    assert {'run_relux_args.json', 'run_relux_train.log', 'run_relux_checkpoint.pth',
            'run_relux_best.pth', 'run_relux_metrics.csv'} <= written
    assert sorted(p.name for p in (run / 'pretrained').iterdir()) == [
        'run_relux_args.json', 'run_relux_best.pth', 'run_relux_checkpoint.pth', 'run_relux_metrics.csv',
        'run_relux_train.log']


@multi_process
def test_each_rank_prints_its_store_share(runs):
    _, (out_one, _, _), (out_two, _, _) = runs
    one, two = store_lines(out_one), store_lines(out_two)
    assert one[('train', 0)][0] == 32 and one[('test', 0)][0] == 41
    assert two[('train', 0)][0] == two[('train', 1)][0] == 16
    assert (two[('test', 0)][0], two[('test', 1)][0]) == (21, 20)
    assert two[('train', 0)][1] == pytest.approx(one[('train', 0)][1] / 2, abs=0.1)


def evaluation_counts(stdout):
    """(examples, clean errors, certification failures) from evaluate.py's result line."""
    total, clean, cert = re.search(r'(\d+) test examples at eps [\d.]+: clean error ([\d.]+) \| '
                                   r'certified error ([\d.]+)', stdout).groups()
    total = int(total)
    return total, round(float(clean) * total), round(float(cert) * total)


@multi_process
def test_distributed_evaluation_counts_every_example_once(runs):
    tmp, (_, run_one, _), _ = runs
    flags = ['--data', 'mnist', '--model', 'relux', '--data_dir', str(tmp / 'data'), '--no_pgd',
             '--saved_model', str(run_one / 'pretrained' / 'run_relux'), '--epsilon', '0.02',
             '--test_batch_size', '8', '--workers', '0', '--cert_seed', '0']   # the same starts in both
    one, _, _ = launch(tmp, 'eval_one', 'evaluate.py', flags)
    two, _, _ = launch(tmp, 'eval_two', 'evaluate.py', flags, nproc=2)
    total, wrong, uncertified = evaluation_counts(one)
    assert evaluation_counts(two) == (total, wrong, uncertified) and total == 41
    assert wrong < uncertified < total, 'choose an eps where some, not all, examples certify'


# ----------------------------------------------------------------------------- in one process

pytestmark = pytest.mark.usefixtures('one_thread')


def test_shards_are_disjoint_equal_and_split_one_process_batches():
    shards = [ranks.ShardSampler(23, r, 3, shuffle=False) for r in range(3)]
    owned = torch.cat([s.indices for s in shards])
    assert len(set(owned.tolist())) == 21 and all(len(s) == 7 for s in shards)
    steps = zip(*(torch.tensor(list(s)).split(2) for s in shards))
    assert torch.equal(torch.cat([torch.cat(step).sort().values for step in steps]), torch.arange(21))
    shuffled = ranks.ShardSampler(23, 1, 3, seed=5)
    first = list(shuffled)
    shuffled.set_epoch(1)
    second = list(shuffled)
    assert sorted(first) == sorted(second) == shards[1].indices.tolist() and first != second


@pytest.mark.parametrize('size', [10, 11, 1])
def test_eval_indices_cover_every_example_once(size):
    parts = [ranks.eval_indices(size, ranks.Runtime(torch.device('cpu'), r, 4)) for r in range(4)]
    assert sorted(torch.cat(parts).tolist()) == list(range(size))


def certify_split(model, data, args, batch, owned=None):
    """(clean errors, failures) over the examples ``owned`` (all) in batches of ``batch``."""
    x, y = data
    index = torch.arange(len(y)) if owned is None else owned
    loader = [(x[i], y[i], i) for i in index.split(batch)]
    starts = evaluation.evaluation_starts(model, args)
    stats = evaluation.evaluate_certified(model, loader, args, ranks.Runtime(torch.device('cpu')),
                                       args.epsilon, starts)
    return round(stats.clean_err * stats.examples), round(stats.certified_err * stats.examples)


def test_seeded_starts_do_not_depend_on_batches_or_shares():
    torch.manual_seed(0)
    model = utils.select_model('mnist', 'relux')
    args = utils.argparser(data='mnist', model='relux', argv=['--epsilon', '0.001', '--test_sniter', '3',
                                                              '--device', 'cpu'])
    x = torch.rand(13, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 10           # 3 clean errors; at this eps some correct ones certify
    whole = certify_split(model, (x, y), args, 13)
    halves = [certify_split(model, (x, y), args, 3, torch.arange(r, 13, 2)) for r in (0, 1)]
    assert whole == tuple(map(sum, zip(*halves)))
    assert 3 == whole[0] < whole[1] < 13
    first = evaluation.SeededStarts(model, (1, 28, 28), 7).gather(torch.tensor([4, 9]), 'cpu')
    again = evaluation.SeededStarts(model, (1, 28, 28), 7).gather(torch.tensor([9]), 'cpu')
    assert all(torch.equal(first[i][1:], again[i]) for i in first)


def test_store_shard_holds_the_rows_of_the_full_store():
    model = utils.select_model('mnist', 'relux')
    full = local_bound.SingularVectorStore(model, (1, 28, 28), 9, seed=3)
    shard = local_bound.SingularVectorStore(model, (1, 28, 28), 9, seed=3, owned=torch.tensor([1, 4, 7]))
    assert shard.nbytes * 3 == full.nbytes
    index = torch.tensor([7, 1])
    assert all(torch.equal(a, b) for a, b in zip(full.gather(index, 'cpu').values(),
                                                  shard.gather(index, 'cpu').values()))


def test_amp_warmup_then_fp32_certification(tmp_path, monkeypatch):
    """--amp autocasts the plain warm-up epoch only; every bound pass runs in fp32."""
    seen, plain = [], []
    bound, forward = local_bound.bound_outputs, local_bound.BoundedModel.forward

    def recording(model, x, *args, **kwargs):
        seen.append((x.dtype, torch.is_autocast_enabled('cpu')))
        return bound(model, x, *args, **kwargs)

    def plain_forward(self, x, *args, **kwargs):
        out = forward(self, x, *args, **kwargs)
        if not args and not kwargs:
            plain.append(out.dtype)
        return out

    monkeypatch.setattr(local_bound, 'bound_outputs', recording)
    monkeypatch.setattr(local_bound.BoundedModel, 'forward', plain_forward)
    monkeypatch.chdir(tmp_path)
    data = TensorDataset(torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    argv = ['--amp', '--warmup', '1', '--rampup', '1', '--epochs', '3', '--batch_size', '8',
            '--test_sniter', '2', '--niter', '1', '--workers', '0', '--device', 'cpu', '--prefix', 'amp']
    report = trainer.main(lambda: utils.argparser(data='mnist', model='relux', argv=argv), data, data)
    assert plain and set(plain) == {torch.bfloat16}
    assert seen and set(seen) == {(torch.float32, False)}
    assert report['examples'] == 16 and 0 <= report['certified_err'] <= 1
    log = (tmp_path / 'pretrained' / 'amp_relux_train.log').read_text()
    assert 'clean test err' in log and 'certified err' in log
