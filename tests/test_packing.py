"""grass_dist.scoring.packing: the preconditioner file's packed triangles, the exact mirror of
a symmetric matrix, and the safetensors buffer its arrays are written into."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from grass_dist.scoring.packing import (
    pack_triangle,
    safetensors_buffer,
    symmetric_,
    unpack_triangle,
)
from grass_dist.scoring.precondition import _metadata


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_packed_triangles_round_trip_at_half_the_size(k):
    m = torch.arange(k * k, dtype=torch.float64).reshape(k, k)
    for lower, triangle in ((False, m.triu()), (True, m.tril())):
        packed = pack_triangle(m, lower)
        assert packed.shape == (k * (k + 1) // 2,)
        assert torch.equal(unpack_triangle(packed, lower), triangle)
        into = np.full(k * (k + 1) // 2, np.nan)
        assert np.shares_memory(pack_triangle(m, lower, out=into).numpy(), into)
        assert np.array_equal(into, packed.numpy())
    with pytest.raises(ValueError, match="damaged"):
        unpack_triangle(torch.zeros(k * (k + 1) // 2 + 1, dtype=torch.float64))


@pytest.mark.parametrize(("k", "block"), [(1, 256), (5, 2), (300, 256), (64, 7)])
def test_symmetric_in_place_mirrors_the_upper_triangle_exactly(k, block):
    m = torch.from_numpy(np.random.default_rng(k).standard_normal((k, k)))
    m[0, -1] = -0.0  # copied, not computed: a signed zero keeps its sign
    expected = m.triu() + m.triu(1).mT
    expected[-1, 0] = expected[0, -1] = m[0, -1]
    out = symmetric_(m, block)
    assert out is m
    assert torch.equal(m, expected) and torch.equal(m, m.mT)
    assert torch.signbit(m[-1, 0])


def test_safetensors_buffer_filled_is_a_safetensors_file_of_the_arrays():
    arrays = {
        "n": np.array([7], dtype=np.int64),
        "b.fisher": np.arange(6, dtype=np.float64) - 2.5,
        "a.cholesky": np.array([1.0, -0.0, 3e-300]),
    }
    buf, views = safetensors_buffer(
        {n: (a.dtype, a.size) for n, a in arrays.items()}, {"grass_dist": "{}"}
    )
    for name, a in arrays.items():
        views[name][...] = a
    data = buf.tobytes()
    loaded = st_load(data)
    assert sorted(loaded) == sorted(arrays)
    for name, a in arrays.items():
        assert loaded[name].numpy().tobytes() == a.tobytes()
    expected = st_save({n: torch.from_numpy(a) for n, a in arrays.items()}, {"grass_dist": "{}"})
    assert st_load(expected).keys() == loaded.keys()
    assert _metadata(data) == _metadata(expected) == {}
    assert len(data) == len(expected)
