"""Parquet shard files: ``row_id``, ``key``, ``row_sha256`` and one column per layer.

``row_sha256`` (fixed_size_binary[32]) holds each row's content digest
(``grass_dist.index.content``); files written before it lack the column.

Each shard attempt is serialised in memory, hashed (sha256 goes into the manifest) and put
in one request, so a shard file is either absent or complete.

Every value must survive the cast to the storage dtype: a row whose float32 gradient is
larger than the dtype's largest value (65504 for float16) would be stored as inf and make
the preconditioner of the whole index fail, so `write_shard` refuses it, naming the rows,
and writes nothing.

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

from grass_dist.errors import CorruptShardError, StorageOverflowError, listed
from grass_dist.index.content import DIGEST_BYTES
from grass_dist.index.store import Store

SHARDS_DIR = "shards"  # <index>/shards/<shard id>/<attempt>.parquet
DTYPES = ("float32", "float16", "bfloat16")
_META_DTYPE = b"grass_dist.dtype"
_META_LAYERS = b"grass_dist.layers"
_DIGESTS = "row_sha256"
_RESERVED = ("row_id", "key", _DIGESTS)
# The largest finite value of each storage dtype, and the settings that hold larger ones.
_LARGEST = {"float32": "3.4e38", "float16": "65504", "bfloat16": "3.39e38"}
_WIDER = {"float16": "index.dtype=bfloat16 (or float32)", "bfloat16": "index.dtype=float32"}


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


def table_from_bytes(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """The table of a Parquet file held in `data`, read on this thread alone.

    `pq.read_table` pre-buffers on Arrow's IO threads, which then hold the Python bytes; one
    releasing them while the interpreter exits aborts the process after the caller's work is
    done ("terminate called without an active exception", apache/arrow#34314). Decoding on
    Arrow's CPU threads starts its pool, whose threads a process exiting meanwhile could
    abort the same way (one reader process in several hundred, on a loaded machine): a result
    table decodes in milliseconds on one thread, so no Arrow thread is started.
    The pages' CRC checksums, where the writer recorded them (result tables), are verified:
    a damaged file raises OSError rather than reading as other numbers.
    """
    reader = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
    return reader.read(columns=columns, use_threads=False)


def _float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 -> bfloat16 (nearest-even), as raw uint16 bits; same shape."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    # Rounding a NaN payload could carry into the sign/exponent: force a quiet NaN instead.
    return np.where(np.isnan(x), np.uint16(0x7FC0), out)


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    """(n, k) float array -> the (n, k) values as stored: float32 or float16, or for
    bfloat16 its raw uint16 bits. A value too large for the dtype becomes inf (no warning:
    `write_shard` checks the result)."""
    if dtype == "bfloat16":
        # pyarrow has no bfloat16 type: keep the raw bits; the schema metadata says so.
        return _float32_to_bf16_bits(x)
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(x, dtype=np.dtype(dtype))


def _finite_rows(stored: np.ndarray, dtype: str) -> np.ndarray:
    """bool (n,): whether every value of each row of `_cast`'s (n, k) output is finite."""
    if dtype == "bfloat16":  # exponent bits all ones: inf or NaN
        finite = (stored & np.uint16(0x7F80)) != np.uint16(0x7F80)
    else:
        finite = np.isfinite(stored)
    return finite.all(axis=1)


def _decode(col: pa.ChunkedArray, n: int, dtype: str) -> np.ndarray:
    """FixedSizeList column -> float32 array (n, k)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    k = arr.type.list_size
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    if dtype == "bfloat16":
        flat = _bf16_bits_to_float32(flat)
    return flat.astype(np.float32, copy=False).reshape(n, k)


def check_storable(
    row_ids: np.ndarray,
    keys: list[str],
    phi: dict[str, np.ndarray],
    stored: dict[str, np.ndarray],
    dtype: str,
) -> None:
    """StorageOverflowError naming the rows whose values in `phi` are finite but not once
    cast to `dtype` (`stored`, from `_cast`): larger than the dtype holds. (NaN or inf
    already in `phi` is the gradient computer's to refuse, which names its cause.)

    A finite `stored` layer costs one pass over its values; the rows are looked for only
    when one is not.
    """
    bad = np.zeros(int(row_ids.shape[0]), dtype=bool)
    layers, largest = [], 0.0
    for name, values in stored.items():
        lost = ~_finite_rows(values, dtype)
        if lost.any():
            x = np.asarray(phi[name], dtype=np.float64)
            lost &= np.isfinite(x).all(axis=1)
        if lost.any():
            bad |= lost
            layers.append(name)
            largest = max(largest, float(np.abs(x[lost]).max()))
    if not layers:
        return
    rows = [int(r) for r in row_ids[bad]]
    keys_bad = [keys[i] for i in np.flatnonzero(bad)]
    raise StorageOverflowError(
        f"rows {listed(rows)} (keys {listed(keys_bad)}) have compressed gradients in "
        f"layers {layers} as large as {largest:.4g}, but index.dtype={dtype} holds at most "
        f"{_LARGEST[dtype]}: stored, they would be inf and no preconditioner could be built "
        f"from the index. Nothing of their shard was written; shards committed before are "
        f"kept. Fix: {overflow_fix(dtype)}."
    )


def overflow_fix(dtype: str) -> str:
    """How to index gradients too large for storage dtype `dtype`: a wider dtype, in a new
    store (the dtype is part of the index's fingerprint)."""
    wider = _WIDER.get(dtype)
    if wider is None:
        return "scale the task's loss down, and rebuild the index in a new store.url"
    return f"rebuild the index with {wider} in a new store.url (an index keeps its dtype)"


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

    Raises:
        StorageOverflowError: some rows are finite but too large for `dtype`; nothing is
            written (`check_storable`).

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
    layers, stored = _stored_layers(phi, n, dtype)
    check_storable(row_ids, keys, phi, stored, dtype)
    for name, k in layers:
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(stored[name].reshape(-1)), k)
    data = _parquet_bytes(pa.table(columns), layers, dtype)
    store.write_bytes(rel_path, data)
    return len(data), hashlib.sha256(data).hexdigest()


def _stored_layers(
    phi: dict[str, np.ndarray], n: int, dtype: str
) -> tuple[list[tuple[str, int]], dict[str, np.ndarray]]:
    """[(layer, k)] in `phi`'s order, and each layer's (n, k) rows cast to `dtype`
    (`_cast`); a layer of another shape, or named as a reserved column, is refused."""
    layers: list[tuple[str, int]] = []
    stored: dict[str, np.ndarray] = {}
    for name, x in phi.items():
        x = np.asarray(x)
        if name in _RESERVED:
            raise ValueError(f"layer name {name!r} clashes with a reserved column")
        if x.ndim != 2 or x.shape[0] != n:
            raise ValueError(f"phi[{name!r}] must have shape ({n}, k), got {x.shape}")
        stored[name] = _cast(x, dtype)
        layers.append((name, int(x.shape[1])))
    return layers, stored


def _parquet_bytes(table: pa.Table, layers: list[tuple[str, int]], dtype: str) -> bytes:
    """`table` as a shard file: the storage dtype and layer list in its schema metadata,
    zstd-compressed, the layers' floats byte-stream split, statistics for row_id only."""
    meta = {_META_DTYPE: dtype.encode(), _META_LAYERS: json.dumps(layers).encode()}
    sink = pa.BufferOutputStream()
    pq.write_table(
        table.replace_schema_metadata(meta),
        sink,
        compression="zstd",
        use_dictionary=False,  # keys are unique per row
        # Parquet names the leaf of a (fixed size) list column "<layer>.list.element".
        use_byte_stream_split=[f"{name}.list.element" for name, _ in layers],
        write_statistics=["row_id"],
    )
    return sink.getvalue().to_pybytes()


def repair_fix(store: Store) -> str:
    """How a bad shard of the index in `store` is recomputed: the command, for that index."""
    return (
        f"Fix: recompute it with `python -m jobs.index index.repair=true` and the job's other "
        f"settings, its index {store.url_of('')} included (store.url or index.url); from "
        f"the Python API, the same Index.build call with overrides=['index.repair=true']."
    )


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
    fix = repair_fix(store)
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
