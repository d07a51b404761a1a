"""The preconditioner's triangles: symmetric matrices mirrored from one triangle, and the
file's layout, triangles packed row by row into one safetensors buffer (the format itself
is described in `grass_dist.scoring.precondition`).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import torch


def mirror_upper(s: np.ndarray) -> np.ndarray:
    """The symmetric matrix whose entries on and above the diagonal are those of `s`."""
    return symmetric(torch.from_numpy(s)).numpy()


def symmetric(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose entries on and above the diagonal are those of `upper`."""
    return symmetric_(upper.clone())


def symmetric_(m: torch.Tensor, block: int = 256) -> torch.Tensor:
    """`m` made symmetric in place: each entry below the diagonal becomes its mirror image
    above it (copied, not computed); returns `m`. A block of rows at a time, so each
    transposed read stays in cache: a quarter of the time of adding the two triangles at
    k=4096, and no (k, k) temporaries."""
    k = m.shape[0]
    for lo in range(0, k, block):
        hi = min(lo + block, k)
        m[lo:hi, :lo].copy_(m[:lo, lo:hi].mT)
        diag = m[lo:hi, lo:hi]
        rows, cols = torch.tril_indices(hi - lo, hi - lo, -1, device=m.device)
        diag[rows, cols] = diag[cols, rows]
    return m


def packed_size(k: int) -> int:
    """Entries of a packed (k, k) triangle, diagonal included."""
    return k * (k + 1) // 2


def _triangle_rows(k: int, lower: bool):
    """(row, first column, end column) of each row of the upper or lower triangle."""
    return ((i, 0, i + 1) if lower else (i, i, k) for i in range(k))


def pack_triangle(
    m: torch.Tensor, lower: bool = False, out: np.ndarray | None = None
) -> torch.Tensor:
    """The upper (or lower) triangle of (k, k) `m`, diagonal included, row by row, 1-D;
    written into `out` (k (k + 1) / 2 entries, e.g. a view of a `safetensors_buffer`) when
    given."""
    k = m.shape[0]
    rows = m.contiguous().numpy()
    if out is None:
        out = np.empty(packed_size(k), dtype=rows.dtype)
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


def safetensors_buffer(
    layout: dict[str, tuple[np.dtype, int]], metadata: dict[str, str]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A safetensors file of 1-D arrays of the given (dtype, size), in the order given, and
    `metadata`, as one buffer to fill in place -> (the file's bytes (uint8), {name: the
    writable little-endian view of that array's data in it}).

    The layout is safetensors' own (an 8-byte little-endian header length, the JSON header
    padded with spaces to 8 bytes, then the data back to back). Filling the views writes
    the file: no per-array buffers joined afterwards, so a k=4096 preconditioner's save
    holds one 268 MB copy of its triangles, not two. The header's keys are sorted, so the
    same arrays and metadata are the same bytes in every process.
    """
    dtypes = {n: np.dtype(dt).newbyteorder("<") for n, (dt, _) in layout.items()}
    header: dict[str, Any] = {}
    at = 0
    for name, (_, size) in layout.items():
        nbytes = size * dtypes[name].itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtypes[name].str[1:]],
            "shape": [size],
            "data_offsets": [at, at + nbytes],
        }
        at += nbytes
    header["__metadata__"] = metadata
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    # A bytearray, not np.empty: a file write of an np.empty buffer filled this way took
    # 0.7 s for 268 MB on the benchmark machine, against 0.13 s from a bytearray.
    buf = np.frombuffer(bytearray(start + at), np.uint8)
    buf[:8] = np.frombuffer(len(text).to_bytes(8, "little"), np.uint8)
    buf[8:start] = np.frombuffer(text, np.uint8)
    views = {}
    for name in layout:
        lo, hi = header[name]["data_offsets"]
        views[name] = buf[start + lo : start + hi].view(dtypes[name])
    return buf, views


UNSEALED = "0" * 64  # the metadata value `seal` overwrites with the data's sha256 (same length)


def data_start(buf: Any) -> int:
    """Where a safetensors file's data begins: after its 8-byte length and its header."""
    return 8 + int.from_bytes(bytes(buf[:8]), "little")


def data_sha256(buf: Any) -> str:
    """The hex sha256 of a safetensors file's data (its bytes after the header)."""
    return hashlib.sha256(memoryview(buf)[data_start(buf) :]).hexdigest()


def seal(buf: np.ndarray) -> None:
    """Write the sha256 of a filled `safetensors_buffer`'s data over the `UNSEALED` value in
    its metadata: the header keeps its length, so every offset holds."""
    start = data_start(buf)
    at = 8 + buf[8:start].tobytes().index(UNSEALED.encode())
    buf[at : at + len(UNSEALED)] = np.frombuffer(data_sha256(buf).encode(), np.uint8)
