"""Result tables in the index store: top-k, self-influence, dense scores.

Layout under `<index>/results/<name>/`:

    _COMPLETE.json                   written last; lists every file of the current run
    <run id>/topk.parquet            one row per (kind, query, rank)
    <run id>/self_influence/<shard>.parquet       one row per train row of that shard
    <run id>/dense/<shard>.<tile start>.parquet   train_row + scores[n_query] per tile

Each scoring run writes into a fresh run folder, so the files the current `_COMPLETE.json`
lists are never touched while it is current; readers go through `_COMPLETE.json`, so a
half-written run is never visible. Dense and self-influence part names are deterministic
within a run: a retried scorer task overwrites its own parts instead of adding duplicates.
Scorers write these parts as they go, so no process gathers a row of every train row.
(Result sets written before parts, and ensembles, list one self_influence file.) When a new run
completes, the files of the run it replaces are deleted, and so are the files later stages
derived from that run (`DERIVED`: the HTML report, the LDS record).

A run that never completes (its job killed mid-score, or a reducer retried) leaves its folder
unlisted; `jobs.gc` removes such folders once nothing in them changed for `gc.grace_s`
(`collect_abandoned`). A run whose files gc removed while it ran is refused at `complete`
(ResultsCollectedError), so `_COMPLETE.json` never lists a missing file.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from grass_dist.errors import (
    CorruptResultsError,
    ResultsCollectedError,
    ResultsNotFoundError,
    StoreUnavailableError,
)
from grass_dist.index import GradientIndex, Store
from grass_dist.index.gc import unchanged_for
from grass_dist.index.shards import table_from_bytes

log = logging.getLogger(__name__)

RESULTS = "results"
COMPLETE = "_COMPLETE.json"
# Written next to _COMPLETE.json from the current run's files by later stages: stale (and
# deleted) once another run replaces it.
DERIVED = ("report.html", "lds.json")

SELF_INFLUENCE_SCHEMA = pa.schema(
    [
        ("train_row", pa.int64()),
        ("train_key", pa.string()),
        ("self_influence", pa.float64()),
        ("grad_norm_sq", pa.float64()),
    ]
)


class ArtifactDir:
    """The artifact half of GradientIndex over a plain store folder: where an ensemble's
    averaged result sets live (its members' indexes are below it, in ckpt_<c>/)."""

    def __init__(self, store: Store):
        self.store = store

    def put_artifact(self, rel: str, data: bytes) -> None:
        self.store.write_bytes(rel, data)

    def get_artifact(self, rel: str) -> bytes:
        return self.store.read_bytes(rel)

    def has_artifact(self, rel: str) -> bool:
        return self.store.exists(rel)


Where = GradientIndex | ArtifactDir | str  # a str: the URL of an index or an ensemble's folder


def _where(where: Where) -> GradientIndex | ArtifactDir:
    return ArtifactDir(Store(where)) if isinstance(where, str) else where


def results_dir(name: str) -> str:
    return f"{RESULTS}/{name}"


def run_folder(rel: str) -> str | None:
    """`results/<name>/<run id>` of a file in a run folder; None for any other path."""
    parts = rel.split("/")
    return "/".join(parts[:3]) if len(parts) >= 4 and parts[0] == RESULTS else None


def new_run_dir(name: str) -> str:
    """A fresh folder for one scoring run of result set `name`."""
    return f"{results_dir(name)}/{uuid.uuid4().hex}"


def write_dense_part(
    index: GradientIndex, run_dir: str, shard_id: str, start: int, rows, scores
) -> str:
    """One tile: rows (t,), scores (Q, t) float32 -> its relative path (same inputs, same path)."""
    scores = np.ascontiguousarray(np.asarray(scores, dtype=np.float32).T)  # (t, Q)
    table = pa.table(
        {
            "train_row": pa.array(np.asarray(rows, np.int64)),
            "scores": pa.FixedSizeListArray.from_arrays(
                pa.array(scores.reshape(-1)), scores.shape[1]
            ),
        }
    )
    return write_table(index, run_dir, f"dense/{shard_id}.{start:012d}.parquet", table)


def write_self_influence_part(
    index: GradientIndex,
    run_dir: str,
    shard_id: str,
    rows: np.ndarray,
    keys: list[str],
    self_influence: np.ndarray,
    grad_norm_sq: np.ndarray,
) -> str:
    """One shard's diagonals: rows (n,) int64, n keys, self_influence and grad_norm_sq
    (n,) float64 -> its relative path (same shard, same path)."""
    table = pa.table(
        [
            pa.array(np.asarray(rows, np.int64)),
            pa.array(keys, pa.string()),
            pa.array(np.asarray(self_influence, np.float64)),
            pa.array(np.asarray(grad_norm_sq, np.float64)),
        ],
        schema=SELF_INFLUENCE_SCHEMA,
    )
    return write_table(index, run_dir, f"self_influence/{shard_id}.parquet", table)


def write_table(index: GradientIndex, run_dir: str, file: str, table: pa.Table) -> str:
    return write_tables(index, run_dir, file, [table])


def write_tables(index: GradientIndex, run_dir: str, file: str, tables: Iterable[pa.Table]) -> str:
    """Pieces of one table (same schema) -> one Parquet file, a row group per piece.

    Streamed to the store, so only one piece is in memory. The file is not yet listed by
    any `_COMPLETE.json`, so no reader can see it half-written.
    """
    rel = f"{run_dir}/{file}"
    with index.store.open(rel, "wb") as f:
        writer = None
        for table in tables:
            if writer is None:
                # Page checksums: a file damaged at rest is refused when read, not read as
                # other scores (`table_from_bytes` verifies them).
                writer = pq.ParquetWriter(
                    f, table.schema, compression="zstd", write_page_checksum=True
                )
            writer.write_table(table)
        if writer is None:
            raise ValueError(f"no rows to write to {file}")
        writer.close()
    return rel


def complete(index: GradientIndex, name: str, files: dict[str, Any], summary: dict) -> None:
    """Publish a finished run (one atomic put), then delete the files of the run it replaces
    and what later stages derived from them."""
    _check_present(index.store, files)
    rel = f"{results_dir(name)}/{COMPLETE}"
    old = json.loads(index.get_artifact(rel))["files"] if index.has_artifact(rel) else {}
    index.put_artifact(rel, json.dumps({"files": files, "summary": summary}, indent=1).encode())
    keep = set(_paths(files))
    replaced = [path for path in _paths(old) if path not in keep]
    if not replaced:  # the same run republished (e.g. with its damping choice)
        return
    derived = [f"{results_dir(name)}/{file}" for file in DERIVED]
    try:
        for path in replaced + derived:
            index.store.delete(path)
        for folder in sorted({run_folder(path) for path in replaced} - {None}):
            index.store.prune_folders(folder)
    except StoreUnavailableError as e:  # the new run is published; this is tidying
        log.warning("could not delete the replaced run's result files: %s", e)


def abandon(index: GradientIndex, run_dir: str) -> None:
    """Remove what a scoring run that failed wrote (it was never published), best effort:
    a scorer call still writing may leave a part, which `jobs.gc` removes later."""
    try:
        for rel in sorted(index.store.walk(run_dir)):
            index.store.delete(rel)
        index.store.prune_folders(run_dir)
    except StoreUnavailableError as e:
        log.warning("could not remove the failed scoring run's files: %s", e)


def _check_present(store: Store, files: dict[str, Any]) -> None:
    """ResultsCollectedError unless every listed file exists (one listing per run folder)."""
    paths = _paths(files)
    found: set[str] = set()
    for folder in {run_folder(path) for path in paths} - {None}:
        found |= set(store.walk(folder))
    # A file in a run folder was listed with it; one outside (older result sets) is asked for.
    missing = [p for p in paths if not (p in found if run_folder(p) else store.exists(p))]
    if missing:
        raise ResultsCollectedError(
            f"{len(missing)} result files of this scoring run are gone before it was "
            f"published (e.g. {store.url_of(missing[0])}): was `jobs.gc` run with a "
            "gc.grace_s shorter than the scoring run? Nothing was published and the previous "
            "results are unchanged; rerun the scoring job (and give jobs.gc a longer grace)."
        )


def collect_abandoned(
    store: Store, grace_s: float, dry_run: bool = False, now: float | None = None
) -> dict[str, Any]:
    """Remove the run folders no result set's `_COMPLETE.json` lists (scoring runs that
    never completed) once their newest file is at least `grace_s` old; report what went.

    The listing comes first and each `_COMPLETE.json` is read after it, so a run published
    meanwhile counts as listed. A run still writing has a young file and is kept; one whose
    files go anyway is refused at `complete`.
    """
    files = store.walk(RESULTS)
    listed: set[str | None] = set()
    for rel in files:
        parts = rel.split("/")
        if len(parts) == 3 and parts[2] == COMPLETE:
            done = json.loads(store.read_bytes(rel))["files"]
            listed |= {run_folder(path) for path in _paths(done)}
    folders: dict[str, dict[str, tuple[int, float | None]]] = {}
    for rel, info in files.items():
        folder = run_folder(rel)
        if folder is not None and folder not in listed:
            folders.setdefault(folder, {})[rel] = info
    now = time.time() if now is None else now
    old = {
        folder: found
        for folder, found in folders.items()
        if all(unchanged_for(modified, now, grace_s) for _, modified in found.values())
    }
    for folder in sorted(old) if dry_run else ():
        log.info("would remove abandoned scoring run %s (gc.dry_run)", store.url_of(folder))
    if not dry_run:
        for folder, found in sorted(old.items()):
            for rel in sorted(found):
                store.delete(rel)
            store.prune_folders(folder)
            log.info("removed abandoned scoring run %s", store.url_of(folder))
    return {
        "abandoned_runs": len(folders),
        "young": len(folders) - len(old),
        "removed": len(old),
        "files_removed": sum(len(found) for found in old.values()),
        "bytes_reclaimed": sum(size for found in old.values() for size, _ in found.values()),
    }


def _paths(files: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for value in files.values():
        out.extend(value if isinstance(value, list) else [value])
    return out


def manifest(where: Where, name: str) -> dict[str, Any]:
    """The `_COMPLETE.json` of result set `name` of an index (or its URL, or the URL of an
    ensemble's folder, which holds the averaged result sets but no index.json)."""
    index = _where(where)
    rel = f"{results_dir(name)}/{COMPLETE}"
    if not index.has_artifact(rel):
        raise ResultsNotFoundError(
            f"no complete results named {name!r} in {index.store.url_of('')}: run "
            f"`python -m jobs.score run.name={name}` (or jobs.attribute) first"
        )
    try:
        return json.loads(index.get_artifact(rel))
    except ValueError as exc:  # not JSON (cut short, overwritten)
        raise CorruptResultsError(_damaged(index, rel, name, exc)) from exc


def _damaged(index: GradientIndex | ArtifactDir, rel: str, name: str, why: Exception) -> str:
    return (
        f"result file {index.store.url_of(rel)} of results {name!r} is damaged or gone "
        f"({type(why).__name__}: {why}). Fix: score again, which writes the result set "
        f"afresh: `python -m jobs.score run.name={name}` (or jobs.attribute) with the job's "
        f"settings, or the same Python API attribute call (name={name!r}); the index is "
        f"not affected"
    )


def read_table(index: GradientIndex | ArtifactDir, rel: str, name: str) -> pa.Table:
    """The result file `rel` of result set `name`, or CorruptResultsError naming it and the
    fix."""
    try:
        return table_from_bytes(index.get_artifact(rel))
    except (OSError, pa.ArrowException) as exc:  # gone, cut short, failed page checksums
        raise CorruptResultsError(_damaged(index, rel, name, exc)) from exc


def load_table(where: Where, name: str, kind: str) -> pa.Table:
    """`kind` is 'topk' or 'self_influence' (one row per train row, in train-row order), of
    result set `name` of `where` (as for `manifest`)."""
    index = _where(where)
    files = manifest(index, name)["files"]
    if kind not in files:
        raise ResultsNotFoundError(f"results {name!r} have no {kind} table (files: {list(files)})")
    if isinstance(files[kind], str):
        return read_table(index, files[kind], name)
    tables = [read_table(index, rel, name) for rel in files[kind]]
    if not tables:
        return SELF_INFLUENCE_SCHEMA.empty_table()
    return pa.concat_tables(tables).sort_by("train_row")


def load_dense(where: Where, name: str) -> np.ndarray:
    """The dense (n_train, n_query) float32 score matrix, rows in train-row order, of result
    set `name` of `where` (as for `manifest`)."""
    index = _where(where)
    files = manifest(index, name)["files"]
    if "dense" not in files:
        raise ResultsNotFoundError(
            f"results {name!r} have no dense scores: rerun with scoring.dense=true"
        )
    tables = [read_table(index, rel, name) for rel in files["dense"]]
    table = pa.concat_tables(tables).sort_by("train_row")
    n_query = table.schema.field("scores").type.list_size
    return table["scores"].combine_chunks().flatten().to_numpy().reshape(-1, n_query)


def key_positions(key_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions of `rows` in the sorted `key_rows` (which must contain every one of them)."""
    n = len(key_rows)
    if len(rows) == 0 or (n and key_rows[0] == 0 and key_rows[-1] == n - 1):
        return rows  # none wanted, or sorted + unique rows 0..n-1: each at its own position
    pos = np.searchsorted(key_rows, rows).clip(0, max(n - 1, 0))
    if n == 0 or not np.array_equal(key_rows[pos], rows):
        raise ValueError("train_keys does not cover every ranked train row")
    return pos


def topk_tables(
    query_rows: np.ndarray,
    query_keys: list[str],
    ranked: dict[str, tuple[np.ndarray, np.ndarray]],
    train_keys: tuple[np.ndarray, pa.Array | list[str]],
    breakdown: dict[str, dict[str, np.ndarray]] | None = None,
    rows_per_table: int = 1 << 18,
) -> Iterator[pa.Table]:
    """The top-k table in pieces of about `rows_per_table` rows (bounded memory).

    Args:
        query_rows: (Q,) int64; query_keys: Q keys.
        ranked: kind ('proponent' / 'opponent') -> (scores (Q, k), train rows (Q, k));
            rows -1 mark unfilled slots (fewer than k train rows), which are left out.
        train_keys: (sorted unique train rows (n,), their keys): covers every ranked row.
        breakdown: kind -> {layer: (Q, k) per-layer scores}, as columns `score.<layer>`.

    Rows are ordered by query, kind, rank; columns as in report.TOPK_COLUMNS.
    """
    key_rows, key_values = train_keys
    if not isinstance(key_values, pa.Array):
        key_values = pa.array(key_values, pa.string())
    qkeys = pa.array(query_keys, pa.string())
    kinds = pa.array(list(ranked), pa.string())
    query_rows = np.asarray(query_rows, np.int64)
    layers = list(next(iter(breakdown.values()))) if breakdown else []
    width = sum(rows.shape[1] for _, rows in ranked.values())
    step = max(1, rows_per_table // max(1, width))

    def stack(a: int, arrays: list[np.ndarray]) -> np.ndarray:  # (queries, kinds, k)
        return np.stack([x[a : a + step] for x in arrays], axis=1)

    for a in range(0, len(query_rows), step):
        rows = stack(a, [r for _, r in ranked.values()])
        q, kind, rank = np.nonzero(rows >= 0)  # ordered by query, kind, rank
        picked = rows[q, kind, rank].astype(np.int64)
        scores = stack(a, [s for s, _ in ranked.values()])[q, kind, rank]
        cols = {
            "query_row": pa.array(query_rows[q + a]),
            "query_key": qkeys.take(pa.array(q + a)),
            "rank": pa.array(rank.astype(np.int64)),
            "kind": kinds.take(pa.array(kind)),
            "train_row": pa.array(picked),
            "score": pa.array(scores.astype(np.float64)),
            "train_key": key_values.take(pa.array(key_positions(key_rows, picked))),
        }
        for layer in layers:
            terms = stack(a, [breakdown[kd][layer] for kd in ranked])[q, kind, rank]
            cols[f"score.{layer}"] = pa.array(terms.astype(np.float64))
        yield pa.table(cols)
