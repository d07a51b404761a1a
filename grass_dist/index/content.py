"""Content digests of training rows: what a worker differentiates, not the file it came from.

A row's digest is the sha256 of its item (``dataset[row]``, the input of the task's
collate) walked in a canonical order: every tensor or array contributes its dtype, shape
and bytes, every scalar or string its type and value, dicts their keys in sorted order.
The item is digested before batching, so the digest depends on the example only, never on
the batch, its padding, the batch size or the worker that read it. The task (and so its
collate) is part of the index fingerprint; together they fix what is differentiated.

A shard's digest is the sha256 of its rows' digests in row order: the manifest carries it,
so a changed row anywhere is found by recomputing digests from the data and comparing them
with the manifest, reading a shard file only to name the rows that differ.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

from grass_dist.errors import ConfigError

DIGEST_BYTES = 32  # sha256


def _feed(h: Any, value: Any) -> None:
    # Every value is tagged with its kind, so (1, "1"), [[1], 2] and [1, [2]] stay apart.
    torch = sys.modules.get("torch")  # a tensor means torch is loaded; readers never load it
    if torch is not None and isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16: digest the raw bits
            value = value.detach().view(torch.int16)
        value = value.numpy(force=True)  # detached, on the CPU
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "biufc":
        h.update(b"a%s%r" % (value.dtype.str.encode(), value.shape))
        h.update(np.ascontiguousarray(value).data)  # 0-d becomes (1,): same bytes
    elif isinstance(value, dict):
        h.update(f"d{len(value)}".encode())
        for key in sorted(value, key=str):
            _feed(h, str(key))
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"l{len(value)}".encode())
        for part in value:
            _feed(h, part)
    elif isinstance(value, str):
        data = value.encode()
        h.update(f"s{len(data)}:".encode())
        h.update(data)
    elif isinstance(value, bytes):
        h.update(f"b{len(value)}:".encode())
        h.update(value)
    elif value is None or isinstance(value, (bool, int, float)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        arr = np.asarray(value)  # e.g. a PIL image: its pixels
        if arr.dtype.kind not in "biufc":
            raise ConfigError(
                f"cannot digest a training item holding a {type(value).__name__}: the index "
                "records every row's content to detect changed data. Fix: make data.train "
                "return tensors, arrays, numbers, strings, or lists and dicts of them."
            )
        _feed(h, arr)


def row_digest(item: Any) -> bytes:
    """The 32-byte sha256 of one item's content (see the module docstring)."""
    h = hashlib.sha256()
    _feed(h, item)
    return h.digest()


def row_digests(items: Iterable[Any]) -> np.ndarray:
    """(n, 32) uint8: the digest of each item, in order."""
    out = b"".join(row_digest(item) for item in items)
    return np.frombuffer(out, np.uint8).reshape(-1, DIGEST_BYTES)


def shard_digest(digests: np.ndarray) -> str:
    """Hex sha256 over a shard's row digests (n, 32) uint8, in row order."""
    return hashlib.sha256(np.ascontiguousarray(digests, np.uint8).tobytes()).hexdigest()
