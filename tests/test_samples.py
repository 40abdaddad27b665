"""The bundled MNIST sample (samples/README.md): readable by torchvision offline, and exactly the
official test-set digits its README names."""
import gzip

import numpy as np
import pytest
import torch

import data_load
from helpers import ROOT, SHARED_DATA

SAMPLE = ROOT / 'samples' / 'mnist'
OFFICIAL = SHARED_DATA / 'mnist'


def test_the_sample_loads_offline():
    train, test = data_load.build_datasets('mnist', str(SAMPLE), download=False)
    assert (len(train), len(test)) == (1500, 300)
    x, y = test[0]
    assert x.shape == (1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1 and 0 <= y <= 9


@pytest.mark.data
@pytest.mark.skipif(not (OFFICIAL / 't10k-images-idx3-ubyte.gz').is_file(),
                    reason=f'the official MNIST test set is not at {OFFICIAL}')
def test_the_sample_is_the_official_test_digits_it_names():
    with gzip.open(OFFICIAL / 't10k-images-idx3-ubyte.gz') as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(OFFICIAL / 't10k-labels-idx1-ubyte.gz') as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    train, test = data_load.build_datasets('mnist', str(SAMPLE), download=False)
    assert torch.equal(train.data, torch.from_numpy(images[:1500].copy()))
    assert torch.equal(train.targets, torch.from_numpy(labels[:1500].astype(np.int64)))
    assert torch.equal(test.data, torch.from_numpy(images[8000:8300].copy()))
    assert torch.equal(test.targets, torch.from_numpy(labels[8000:8300].astype(np.int64)))
