"""Parquet shard files: ``row_id``, ``key``, ``row_sha256`` and one column per layer.

``row_sha256`` (fixed_size_binary[32]) holds each row's content digest
(``grass_dist.data.content``); files written before it lack the column.

Each shard attempt is serialised in memory, hashed (sha256 goes into the manifest) and put
in one request, so a shard file is either absent or complete.

Compression: zstd with byte-stream-split encoding. Projected gradients are high-entropy
floats, so a plain codec gains little, but splitting each value's bytes lets zstd squeeze the
sign/exponent bytes: measured ~10-20% smaller than raw for float32 and bfloat16, with
encode/decode time below what the smaller transfer saves; row ids and keys shrink anyway.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grass_dist.data.content import DIGEST_BYTES
from grass_dist.errors import CorruptShardError
from grass_dist.index.store import Store

DTYPES = ("float32", "float16", "bfloat16")
_META_DTYPE = b"grass_dist.dtype"
_META_LAYERS = b"grass_dist.layers"
_DIGESTS = "row_sha256"
_RESERVED = ("row_id", "key", _DIGESTS)


@dataclass
class ShardData:
    """Contents of one shard: ``n`` rows.

    Attributes:
        row_ids: int64 array, shape (n,): global training row of each example.
        keys: n sample keys.
        phi: layer name -> float32 array of shape (n, k_l), the compressed gradients.
        digests: uint8 array (n, 32), each row's content digest; None in files written
            before content digests.
    """

    row_ids: np.ndarray
    keys: list[str]
    phi: dict[str, np.ndarray]
    digests: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.row_ids.shape[0])


def _float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 -> bfloat16 (nearest-even), as raw uint16 bits; same shape."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    # Rounding a NaN payload could carry into the sign/exponent: force a quiet NaN instead.
    return np.where(np.isnan(x), np.uint16(0x7FC0), out)


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _encode(x: np.ndarray, dtype: str) -> pa.Array:
    """(n, k) float array -> FixedSizeListArray[k] of the storage type (vectorised)."""
    n, k = x.shape
    if dtype == "bfloat16":
        # pyarrow has no bfloat16 type: keep the raw bits; the schema metadata says so.
        flat = _float32_to_bf16_bits(x.reshape(-1))
    else:
        flat = np.ascontiguousarray(x, dtype=np.dtype(dtype)).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), k)


def _decode(col: pa.ChunkedArray, n: int, dtype: str) -> np.ndarray:
    """FixedSizeList column -> float32 array (n, k)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    k = arr.type.list_size
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    if dtype == "bfloat16":
        flat = _bf16_bits_to_float32(flat)
    return flat.astype(np.float32, copy=False).reshape(n, k)


def _encode_digests(digests: np.ndarray, n: int) -> pa.Array:
    """(n, 32) uint8 -> FixedSizeBinaryArray[32] (one buffer, no per-row objects)."""
    digests = np.ascontiguousarray(digests, np.uint8)
    if digests.shape != (n, DIGEST_BYTES):
        raise ValueError(f"digests must have shape ({n}, {DIGEST_BYTES}), got {digests.shape}")
    buf = pa.py_buffer(digests.tobytes())
    return pa.Array.from_buffers(pa.binary(DIGEST_BYTES), n, [None, buf])


def _decode_digests(col: pa.ChunkedArray, n: int) -> np.ndarray:
    """FixedSizeBinary[32] column -> (n, 32) uint8."""
    arr = col.combine_chunks()
    data = np.frombuffer(arr.buffers()[1], np.uint8)
    return data[arr.offset * DIGEST_BYTES :][: n * DIGEST_BYTES].reshape(n, DIGEST_BYTES)


def write_shard(
    store: Store,
    rel_path: str,
    row_ids: np.ndarray,
    keys: list[str],
    phi: dict[str, np.ndarray],
    dtype: str = "float32",
    digests: np.ndarray | None = None,
) -> tuple[int, str]:
    """Serialise one shard and write it to ``store`` at ``rel_path``.

    Args:
        row_ids: int64, shape (n,).
        keys: n sample keys.
        phi: layer name -> array (n, k_l), any float dtype; columns keep this order.
        dtype: storage dtype, one of float32 / float16 / bfloat16.
        digests: uint8 (n, 32), each row's content digest; None writes no digest column.

    Returns:
        (nbytes, sha256 hex digest) of the written file.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    row_ids = np.asarray(row_ids)
    if row_ids.ndim != 1:
        raise ValueError(f"row_ids must have shape (n,), got {row_ids.shape}")
    n = row_ids.shape[0]
    if len(keys) != n:
        raise ValueError(f"got {len(keys)} keys for {n} row_ids")
    columns: dict[str, pa.Array] = {
        "row_id": pa.array(row_ids.astype(np.int64, copy=False)),
        "key": pa.array([str(k) for k in keys], type=pa.string()),
    }
    if digests is not None:
        columns[_DIGESTS] = _encode_digests(digests, n)
    layers: list[list[object]] = []
    for name, x in phi.items():
        x = np.asarray(x)
        if name in _RESERVED:
            raise ValueError(f"layer name {name!r} clashes with a reserved column")
        if x.ndim != 2 or x.shape[0] != n:
            raise ValueError(f"phi[{name!r}] must have shape ({n}, k), got {x.shape}")
        columns[name] = _encode(x, dtype)
        layers.append([name, int(x.shape[1])])
    meta = {_META_DTYPE: dtype.encode(), _META_LAYERS: json.dumps(layers).encode()}
    table = pa.table(columns).replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        use_dictionary=False,  # keys are unique per row
        # Parquet names the leaf of a (fixed size) list column "<layer>.list.element".
        use_byte_stream_split=[f"{name}.list.element" for name, _ in layers],
        write_statistics=["row_id"],
    )
    data = sink.getvalue().to_pybytes()
    store.write_bytes(rel_path, data)
    return len(data), hashlib.sha256(data).hexdigest()


def read_shard(
    store: Store,
    rel_path: str,
    layers: list[str] | None = None,
    expected_sha256: str | None = None,
) -> ShardData:
    """Read one shard; ``layers`` selects columns (None = all) and phi comes back float32.

    Raises:
        CorruptShardError: file missing, unparsable, or its sha256 differs from the expected.
    """
    where = store.url_of(rel_path)
    fix = "Fix: rerun `python -m jobs.index index.repair=true` to recompute it."
    try:
        data = store.read_buffer(rel_path)
    except FileNotFoundError as exc:
        raise CorruptShardError(f"shard file {where} is missing. {fix}") from exc
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise CorruptShardError(
                f"shard file {where} is corrupt: sha256 {actual[:16]}... does not match the "
                f"manifest's {expected_sha256[:16]}... ({len(data)} bytes). {fix}"
            )
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        meta = pf.schema_arrow.metadata or {}
        dtype = meta.get(_META_DTYPE, b"float32").decode()
        stored = [name for name, _ in json.loads(meta.get(_META_LAYERS, b"[]"))]
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorruptShardError(f"shard file {where} cannot be parsed ({exc}). {fix}") from exc
    wanted = stored if layers is None else list(layers)
    missing = [name for name in wanted if name not in stored]
    if missing:
        raise KeyError(f"layers {missing} not in shard {where} (it has {stored})")
    try:
        extra = [_DIGESTS] if _DIGESTS in pf.schema_arrow.names else []
        table = pf.read(columns=["row_id", "key", *extra, *wanted])
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorruptShardError(f"shard file {where} cannot be parsed ({exc}). {fix}") from exc
    n = table.num_rows
    row_ids = table.column("row_id").to_numpy().astype(np.int64, copy=False)
    keys = table.column("key").to_pylist()
    phi = {name: _decode(table.column(name), n, dtype) for name in wanted}
    digests = _decode_digests(table.column(_DIGESTS), n) if extra else None
    return ShardData(row_ids=row_ids, keys=keys, phi=phi, digests=digests)
