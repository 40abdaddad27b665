"""The per-example store of start vectors (local_bound.SingularVectorStore): gather and scatter,
sharding, warm starts that converge to the top singular vectors of each example's masked
layers, and a store restricted to some layers (the others use their global norm).

References never call the code under test: explicit matrices come from applying the layers to
basis vectors, norms and singular vectors from ``torch.linalg``, the bound pass from
``helpers.reference_pass``. Single-threaded, a few seconds.
"""
import pytest
import torch

import local_bound as lb
from settings import AUTHORS, TRAINING
from helpers import (affine_layers, explicit_matrix, masked_matrix, propagate_records, reference_pass,
                     small_conv_net, top_singular, _seed)


pytestmark = pytest.mark.usefixtures('one_thread')


def test_store_gather_scatter_round_trip_and_sharding():
    model = small_conv_net('relux', seed=60, dtype=torch.float32)
    store = lb.SingularVectorStore(model, (2, 7, 7), 10, seed=5)
    shapes = {i: s for i, (l, s) in zip([0, 2, 5], affine_layers(model, (2, 7, 7)))}
    assert set(store.vectors) == set(shapes)
    for i, s in shapes.items():
        assert tuple(store.vectors[i].shape) == (10, *s)
    index = torch.tensor([7, 2, 9])
    got = store.gather(index, 'cpu')
    for i in shapes:
        torch.testing.assert_close(got[i], store.vectors[i][index])
    new = {i: torch.randn(3, *s) for i, s in shapes.items()}
    store.scatter(index, new)
    back = store.gather(index, 'cpu')
    for i in shapes:
        torch.testing.assert_close(back[i], new[i])
        torch.testing.assert_close(store.vectors[i][index], new[i])
    untouched = torch.tensor([0, 1, 3])
    fresh = lb.SingularVectorStore(model, (2, 7, 7), 10, seed=5)
    for i in shapes:
        torch.testing.assert_close(store.vectors[i][untouched], fresh.vectors[i][untouched])
    # Sharding: a store owning examples [7, 2, 5] holds the same rows as the full store.
    owned = torch.tensor([7, 2, 5])
    shard = lb.SingularVectorStore(model, (2, 7, 7), 10, seed=5, owned=owned)
    for i in shapes:
        assert shard.vectors[i].shape[0] == 3
        torch.testing.assert_close(shard.gather(torch.tensor([5, 7]), 'cpu')[i], fresh.vectors[i][torch.tensor([5, 7])])
    shard.scatter(torch.tensor([2]), {i: torch.full((1, *s), 3.0) for i, s in shapes.items()})
    for i in shapes:
        assert torch.all(shard.vectors[i][1] == 3.0)        # dataset index 2 is the shard's row 1
        assert not torch.any(shard.vectors[i][0] == 3.0)
    with pytest.raises(IndexError):
        shard.gather(torch.tensor([3]), 'cpu')
    with pytest.raises(ValueError):
        lb.SingularVectorStore(model, (2, 7, 7), 10, layers=[1])


def one_power_step(mat, u, in_mask, out_mask):
    """u <- D_in u; v = normalise(D_out W u); u = normalise(D_in W^T v) (docs/method.md §2)."""
    a = masked_matrix(mat, in_mask, out_mask)
    v = a @ u
    v = v / v.norm()
    back = a.T @ v
    return back / back.norm()


def test_store_warm_start_converges_to_top_singular_vectors():
    model = small_conv_net('relux', seed=61, dtype=torch.float32)
    _seed(62)
    x = 0.2 + 0.6 * torch.rand(2, 2, 7, 7)
    y = torch.tensor([1, 2])
    eps = 0.2
    index = torch.tensor([3, 1])
    store = lb.SingularVectorStore(model, (2, 7, 7), 5, seed=0)
    before = {i: v.clone() for i, v in store.vectors.items()}
    lb.global_lipschitz(model, sniter=3000, input_shape=(2, 7, 7))   # converge the global vectors first
    lb.worst_case_logits(model, x, y, eps, TRAINING, store=store, index=index)
    recs = propagate_records(model, x, eps)
    mats = {rec.index: explicit_matrix(rec.op.layer, rec.op.in_shape).double() for rec in recs}
    for rec in recs:
        i = rec.index
        assert not torch.equal(store.vectors[i][index], before[i][index]), f'layer {i}: store not written'
        torch.testing.assert_close(store.vectors[i][torch.tensor([0, 2, 4])], before[i][torch.tensor([0, 2, 4])])
        for b in range(2):
            in_mask = None if rec.in_mask is None else rec.in_mask[b].double()
            out_mask = None if rec.out_mask is None else rec.out_mask[b].double()
            expected = one_power_step(mats[i], before[i][index[b]].double().reshape(-1), in_mask, out_mask)
            torch.testing.assert_close(store.vectors[i][index[b]].double().reshape(-1), expected,
                                       rtol=1e-4, atol=1e-5, msg=f'layer {i}: one power step from the store')
    for _ in range(150):
        lb.worst_case_logits(model, x, y, eps, TRAINING, store=store, index=index)
    recs = propagate_records(model, x, eps)
    for rec in recs:
        for b in range(2):
            in_mask = None if rec.in_mask is None else rec.in_mask[b].double()
            out_mask = None if rec.out_mask is None else rec.out_mask[b].double()
            a = masked_matrix(mats[rec.index], in_mask, out_mask)
            _, s, vh = torch.linalg.svd(a)
            assert s[0] > s[1] * 1.02, 'test needs a singular gap'
            u = store.vectors[rec.index][index[b]].double().reshape(-1)
            cos = float((u @ vh[0]).abs() / u.norm())
            assert cos > 0.999, f'layer {rec.index} sample {b}: stored vector not the top singular vector ({cos})'


def test_store_restricted_layers_use_global_norm_elsewhere():
    model = small_conv_net('relux', seed=63)
    model32 = small_conv_net('relux', seed=63, dtype=torch.float32)
    _seed(64)
    x = 0.2 + 0.6 * torch.rand(3, 2, 7, 7)
    y = torch.tensor([0, 1, 2])
    eps = 0.2
    store = lb.SingularVectorStore(model32, (2, 7, 7), 6, layers=[0, 5], seed=1)
    assert set(store.vectors) == {0, 5} and 2 not in store
    out = lb.bound_outputs(model32, x, y, eps, AUTHORS.replace(sniter=3000, opt_iter=1000), store=store,
                           index=torch.tensor([0, 4, 5]))
    refs = reference_pass(model, x.double(), eps)
    for b, ref in enumerate(refs):
        expected = 1.0
        for idx, mat, in_mask, out_mask in ref['affine']:
            if idx in (0, 5):
                expected *= top_singular(masked_matrix(mat, in_mask, out_mask))
            else:
                expected *= ref['global_sigma'][idx]
        assert float(out.lipschitz[b].detach()) == pytest.approx(expected, rel=1e-3), f'sample {b}'
        assert float(out.lipschitz[b].detach()) > ref['local_product'] * (1 + 1e-3), 'layer 2 should use its (larger) global norm'
