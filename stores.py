"""The per-example store of power-iteration start vectors (docs/method.md §4) and the seeded
normal draws that fill it."""
import hashlib
import math

import torch

import spectral
from composition import affine_input_shapes, key_order


class SingularVectorStore:
    """Per-example start vectors of the masked power iteration (warm starts across epochs).

    One tensor per stored layer, shape ``[n, *layer_input_shape]``, random normal at creation (an
    example's rows depend only on ``seed`` and its index, see ``example_normals``), on ``device``
    in ``dtype``. ``owned`` (a LongTensor of dataset indices) makes the store hold only
    those examples (a distributed rank's share); ``gather``/``scatter`` always take dataset indices.
    """

    def __init__(self, model, input_shape, num_examples, *, layers=None, device='cpu',
                 dtype=torch.float32, pin_memory=False, owned=None, seed=None):
        shapes = affine_input_shapes(model, input_shape)
        if layers is not None:
            unknown = sorted(set(layers) - set(shapes), key=key_order)
            if unknown:
                raise ValueError(f'--indices {unknown} are not conv/linear layers before the last; '
                                 f'choose from {list(shapes)}')
            shapes = {i: shapes[i] for i in sorted(layers, key=key_order)}
        self.shapes, self.device, self.dtype = shapes, torch.device(device), dtype
        self.num_examples = num_examples
        self.position = None
        count = num_examples
        if owned is not None:
            owned = torch.as_tensor(owned, dtype=torch.long)
            self.position = torch.full((num_examples,), -1, dtype=torch.long)
            self.position[owned] = torch.arange(len(owned))
            self.position = self.position.to(self.device)
            count = len(owned)
        self.num_owned = count
        rows = owned if owned is not None else torch.arange(num_examples)
        self.vectors = _store_tensors(shapes, rows, seed, dtype, self.device, pin_memory)

    def __contains__(self, layer_index):
        return layer_index in self.vectors

    @property
    def nbytes(self):
        return sum(v.numel() * v.element_size() for v in self.vectors.values())

    def _rows(self, index):
        index = index.to(self.device)
        if self.position is None:
            return index
        rows = self.position[index]
        if (rows < 0).any():
            raise IndexError('store asked for examples it does not own')
        return rows

    def gather(self, index, device, dtype=torch.float32):
        """{layer: start vectors of examples ``index``} on ``device`` in ``dtype``."""
        rows = self._rows(index)
        return {i: v[rows].to(device=device, dtype=dtype, non_blocking=True) for i, v in self.vectors.items()}

    def scatter(self, index, vectors):
        """Write back (detached) the final vectors of examples ``index``; a vector that is zero,
        NaN, inf or too small to stay a direction in the store's dtype is re-drawn instead."""
        rows = self._rows(index)
        for i, u in vectors.items():
            self.vectors[i][rows] = spectral.usable_vectors(u.detach().to(device=self.device, dtype=self.dtype))

    def state_dict(self):
        return {'vectors': self.vectors, 'position': self.position}

    def load_state_dict(self, state):
        for i, v in state['vectors'].items():
            if v.shape != self.vectors[i].shape:
                raise ValueError(f'store layer {i}: saved shape {tuple(v.shape)} != {tuple(self.vectors[i].shape)}')
            self.vectors[i].copy_(v)


def example_normals(shapes, index, seed):
    """{layer: N(0,1) rows [len(index), *shape]} where example i's rows depend on (seed, i) alone.

    An example therefore starts from the same vectors whichever rank, shard or batch holds it.
    """
    sizes = [math.prod(shape) for shape in shapes.values()]
    flat = torch.empty(len(index), sum(sizes))
    generator = torch.Generator()
    for row, i in zip(flat, torch.as_tensor(index).tolist()):
        generator.manual_seed(example_seed(seed, i))
        row.normal_(generator=generator)
    return {layer: part.reshape(-1, *shape)
            for (layer, shape), part in zip(shapes.items(), flat.split(sizes, dim=1))}


def example_seed(seed, i):
    """The generator seed of example ``i`` under ``seed``: ``seed * 2**32 + i`` for a seed below
    2**32 (the layout every recorded run used), else a 64-bit hash of both, so that every bit of a
    secret 63-bit seed counts."""
    if seed < 2**32:
        return (seed % 2**32) * 2**32 + i
    digest = hashlib.blake2b(f'{seed}:{i}'.encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little')


def _store_tensors(shapes, rows, seed, dtype, device, pin_memory):
    """Store tensors for the examples ``rows`` (``seed`` None: drawn from the global RNG).

    Filled by ``example_normals`` in chunks of about 2**26 numbers, so a half-precision store
    needs no full-size fp32 temporary.
    """
    seed = int(torch.randint(2**31, ())) if seed is None else seed
    pin = pin_memory and device.type == 'cpu'
    out = {i: torch.empty((len(rows), *shape), dtype=dtype, device=device, pin_memory=pin)
           for i, shape in shapes.items()}
    chunk = max(1, 2**26 // max(1, sum(math.prod(shape) for shape in shapes.values())))
    for start in range(0, len(rows), chunk):
        for i, block in example_normals(shapes, rows[start:start + chunk], seed).items():
            out[i][start:start + len(block)] = block.to(device=device, dtype=dtype)
    return out
