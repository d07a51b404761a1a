"""The preconditioner file's layout: triangles packed row by row, and safetensors bytes
written with one copy of their data (the format itself is described in
`grass_dist.scoring.precondition`).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch


def _triangle_rows(k: int, lower: bool):
    """(row, first column, end column) of each row of the upper or lower triangle."""
    return ((i, 0, i + 1) if lower else (i, i, k) for i in range(k))


def pack_triangle(m: torch.Tensor, lower: bool = False) -> torch.Tensor:
    """The upper (or lower) triangle of (k, k) `m`, diagonal included, row by row, 1-D."""
    k = m.shape[0]
    rows = m.contiguous().numpy()
    out = np.empty(k * (k + 1) // 2, dtype=rows.dtype)
    at = 0
    for i, lo, hi in _triangle_rows(k, lower):
        out[at : at + hi - lo] = rows[i, lo:hi]
        at += hi - lo
    return torch.from_numpy(out)


def unpack_triangle(packed: torch.Tensor, lower: bool = False) -> torch.Tensor:
    """The (k, k) triangular matrix (zeros off the triangle) that `pack_triangle` packed."""
    k = int(round((math.sqrt(8 * packed.numel() + 1) - 1) / 2))
    if k * (k + 1) // 2 != packed.numel():
        raise ValueError(
            f"{packed.numel()} entries are no packed triangle: the preconditioner file is "
            "damaged; rebuild it with the precondition stage"
        )
    flat = packed.numpy()
    out = np.zeros((k, k), dtype=flat.dtype)
    at = 0
    for i, lo, hi in _triangle_rows(k, lower):
        out[i, lo:hi] = flat[at : at + hi - lo]
        at += hi - lo
    return torch.from_numpy(out)


_SAFETENSORS_DTYPES = {"f8": "F64", "i8": "I64"}  # numpy dtype.str without its byte order


def safetensors_bytes(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A safetensors file of 1-D `arrays`, in the order given, and `metadata`.

    The layout is safetensors' own (an 8-byte little-endian header length, the JSON header
    padded with spaces to 8 bytes, then the data back to back), written here with one copy
    of the data: `safetensors.torch.save` copies each tensor out and then again, about 0.7 s
    of a k=4096 preconditioner's save. The header's keys are sorted, so the same arrays and
    metadata are the same bytes in every process.
    """
    data = {n: np.ascontiguousarray(a, a.dtype.newbyteorder("<")) for n, a in arrays.items()}
    header: dict[str, Any] = {}
    at = 0
    for name, a in data.items():
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[a.dtype.str[1:]],
            "shape": [a.size],
            "data_offsets": [at, at + a.nbytes],
        }
        at += a.nbytes
    header["__metadata__"] = metadata
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    chunks = [len(text).to_bytes(8, "little"), text]
    return b"".join(chunks + [a.reshape(-1) for a in data.values()])
