"""norms.py: the one place that names norms."""
import math

import pytest
import torch

import attacks
import norms


@pytest.mark.parametrize('given,p', [('inf', math.inf), ('Linf', math.inf), (math.inf, math.inf), ('2', 2.0),
                                     (2, 2.0), ('l2', 2.0), ('1', 1.0), (1, 1.0)])
def test_order_reads_every_name(given, p):
    assert norms.order(given) == p


@pytest.mark.parametrize('bad', [3, '3', True, 'l3', None, 0.5])
def test_order_refuses_other_norms(bad):
    with pytest.raises(ValueError, match='norm must be one of'):
        norms.order(bad)


def test_attacks_accept_only_l2_and_linf():
    assert attacks.parse_norm('2') == 2 and attacks.parse_norm('inf') == math.inf
    with pytest.raises(ValueError):
        attacks.parse_norm(1)


@pytest.mark.parametrize('p', [1.0, 2.0, math.inf])
def test_batch_norms_match_vector_norm(p):
    t = torch.randn(5, 3, 4, 4)
    got = norms.batch_norms(t, p)
    assert got.shape == (5, 1, 1, 1)
    torch.testing.assert_close(got.flatten(), torch.linalg.vector_norm(t.flatten(1), ord=p, dim=1))
