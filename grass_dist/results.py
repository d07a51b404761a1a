"""Result tables in the index store: top-k, self-influence, dense scores.

Layout under `<index>/results/<name>/`: `topk-<attempt>.parquet`,
`self_influence-<attempt>.parquet`, `dense/<shard id>-<attempt>.parquet` and `_COMPLETE.json`,
written last (atomically), listing every file. Readers go through `_COMPLETE.json`, and no
file is ever overwritten, so a half-written or re-running result is never read: until the
new `_COMPLETE.json` lands, readers keep seeing the previous complete result set.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grass_dist.errors import ResultsNotFoundError
from grass_dist.index import GradientIndex


def _to_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def results_dir(name: str) -> str:
    return f"results/{name}"


def write_dense_part(
    index: GradientIndex, name: str, shard_id: str, rows: np.ndarray, scores: np.ndarray
) -> str:
    """One shard's dense block: rows (n,), scores (n, Q) float32 -> relative file path."""
    n_query = scores.shape[1]
    flat = pa.array(np.ascontiguousarray(scores, np.float32).reshape(-1))
    table = pa.table(
        {
            "train_row": pa.array(rows, pa.int64()),
            "scores": pa.FixedSizeListArray.from_arrays(flat, n_query),
        }
    )
    rel = f"{results_dir(name)}/dense/{shard_id}-{uuid.uuid4().hex}.parquet"
    index.put_artifact(rel, _to_bytes(table))
    return rel


def write_table(index: GradientIndex, name: str, file: str, table: pa.Table) -> str:
    """Write `table` as a new file named after `file` (e.g. topk.parquet); returns its path."""
    stem, ext = os.path.splitext(file)
    rel = f"{results_dir(name)}/{stem}-{uuid.uuid4().hex}{ext}"
    index.put_artifact(rel, _to_bytes(table))
    return rel


def complete(index: GradientIndex, name: str, files: dict[str, Any], summary: dict) -> None:
    """Mark the result set complete: the only file readers trust."""
    body = {"files": files, "summary": summary}
    index.put_artifact(f"{results_dir(name)}/_COMPLETE.json", json.dumps(body, indent=1).encode())


def manifest(index: GradientIndex, name: str) -> dict[str, Any]:
    rel = f"{results_dir(name)}/_COMPLETE.json"
    if not index.has_artifact(rel):
        raise ResultsNotFoundError(
            f"no complete results named {name!r} in {index.store.url_of('')}: run "
            f"`python -m jobs.score run.name={name}` (or jobs.attribute) first"
        )
    return json.loads(index.get_artifact(rel))


def load_table(index: GradientIndex, name: str, kind: str) -> pa.Table:
    """`kind` is 'topk' or 'self_influence'."""
    files = manifest(index, name)["files"]
    if kind not in files:
        raise ResultsNotFoundError(f"results {name!r} have no {kind} table (files: {list(files)})")
    return _from_bytes(index.get_artifact(files[kind]))


def load_dense(index: GradientIndex, name: str) -> np.ndarray:
    """The dense (n_train, n_query) float32 score matrix, rows in train-row order."""
    files = manifest(index, name)["files"]
    if "dense" not in files:
        raise ResultsNotFoundError(
            f"results {name!r} have no dense scores: rerun with scoring.dense=true"
        )
    tables = [_from_bytes(index.get_artifact(rel)) for rel in files["dense"]]
    table = pa.concat_tables(tables).sort_by("train_row")
    n_query = table.schema.field("scores").type.list_size
    return table["scores"].combine_chunks().flatten().to_numpy().reshape(-1, n_query)
