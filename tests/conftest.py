"""Put the repository root on sys.path; share one short real-MNIST training run between tests.

The helpers the tests share are in helpers.py (tests/ is on sys.path: pytest's default 'prepend'
import mode inserts the folder of this conftest.py), the markers in ../pytest.ini."""
import functools
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytest.register_assert_rewrite('helpers')     # detailed assertion messages in the shared helpers too
from helpers import HAVE_MNIST, MNIST_MINI  # noqa: E402
import settings  # noqa: E402

OS_SECRET_SEED = settings.secret_seed      # the real draw, for the tests of secret seeds (``os_seeds``)


@pytest.fixture(scope='session', autouse=True)
def known_certification_seed():
    """The suite repeats: in this process the secret seed behind ``BoundSettings(seed=None)`` and
    the scripts' default ``--cert_seed`` is 0 (scripts run as subprocesses get a real one unless
    the test passes ``--cert_seed``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(settings, 'secret_seed', lambda: 0)
        yield


@pytest.fixture
def os_seeds(monkeypatch):
    """The real secret seeds of the OS, for one test."""
    monkeypatch.setattr(settings, 'secret_seed', OS_SECRET_SEED)

# The README's quick job: 5 short epochs on 1,500 real digits, certified on 300 test digits.
QUICK_ARGV = ['--epochs', '5', '--rampup', '3', '--gloro', '--sniter', '2', '--opt_iter', '2',
              '--epsilon_train', '1.75', '--batch_size', '64', '--test_sniter', '20', '--test_opt_iter', '20',
              '--niter', '10', '--workers', '0', '--prefix', 'e2e', '--verbose', '0', '--device', 'cpu']


@pytest.fixture(scope='session')
def trained_mnist(tmp_path_factory):
    """The quick job trained once per session (about 85 s on 2 cores): its folder, checkpoint
    prefix, final report, the 300 test digits as tensors and the loaded best model."""
    if not HAVE_MNIST:
        pytest.skip(f'real MNIST digits not found at {MNIST_MINI}')
    import torch
    from torch.utils.data import Subset

    import checkpoints
    import data_load
    import trainer
    import utils
    train_set, test_set = data_load.build_datasets('mnist', str(MNIST_MINI), download=False)
    train_set, test_set = Subset(train_set, range(1500)), Subset(test_set, range(300))
    folder = tmp_path_factory.mktemp('trained_mnist')
    parse = functools.partial(utils.argparser, argv=QUICK_ARGV, data='mnist', model='relux', epochs=300,
                              warmup=0, rampup=150, epsilon=1.58, epsilon_train=1.58)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        torch.manual_seed(0)
        report = trainer.main(parse, train_set, test_set)
    finally:
        os.chdir(cwd)
    prefix = folder / 'pretrained' / 'e2e_relux'
    model, _ = checkpoints.load_model(f'{prefix}_best.pth', 'mnist', 'relux')
    model.eval()
    x = torch.stack([test_set[i][0] for i in range(len(test_set))])
    y = torch.tensor([test_set[i][1] for i in range(len(test_set))])
    return SimpleNamespace(folder=folder, prefix=prefix, report=report, test_set=test_set,
                           train_set=train_set, model=model, x=x, y=y, eps=1.58)


@pytest.fixture
def one_thread():
    """One intra-op thread: the 2-core machines run several processes at once, and small passes run
    far faster so."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
