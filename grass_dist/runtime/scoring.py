"""Scorer tasks: all-pairs scoring fanned out over groups of committed shards.

Each Ray task takes one group of shards, streams them tile by tile through a TileScorer,
writes each shard's per-row outputs (dense tiles, self-influence) as result parts as it
goes, and returns only its partial top-k, the train keys of the rows it ranks, and the part
paths. The keys come from the shards as they are scored: a task keeps the keys of up to
`_KEPT_KEYS` rows it read (about 35 MB with their strings), and reads back only those of ranked
rows beyond them, so no shard is read twice for its keys in all but the largest groups.
The prepared queries go through the object store once and every task reads the same copy.
Partials are merged in submission order, so the answer never depends on which task
finished first.

A task scores consecutive small shards of its group together, as one block of up to
`_BLOCK_ROWS` rows (at most one tile): the self-influence GEMM streams each layer's k x k
whitener once per block, and on 128-row shards that GEMM runs about 15% slower than on
1024-row blocks. Outputs are still written per shard, under the same names.

A scorer whose process dies is retried by Ray (`max_retries`). Its parts have
deterministic names, so the retry overwrites what the dead attempt wrote: no pair is lost
or written twice, and only the successful attempt's file list reaches the results.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from grass_dist.index import GradientIndex, ShardRecord
from grass_dist.runtime.executors import Executor
from grass_dist.runtime.faults import KillOnce
from grass_dist.scoring import results
from grass_dist.scoring.score import (
    Block,
    QuerySide,
    ScorePartial,
    TileScorer,
    TrainKeys,
    concat,
    join_keys,
    layer_scores,
    score_stream,
)

_PAIR_CHUNK = 1 << 16  # pairs gathered at once for the per-layer breakdown
_BLOCK_ROWS = 1024  # rows of consecutive shards scored as one block (see the module doc)
_KEPT_KEYS = 1 << 18  # train keys a scorer keeps as it reads, for the rows it will rank


@dataclass(frozen=True)
class ScoreOptions:
    """How every scorer task runs."""

    topk: int
    tile_rows: int = 4096
    verify: bool = True
    cpus_per_task: float = 1.0
    max_retries: int = 3
    fresh_process: bool = False  # end each task's worker process (returns all its memory)


def shard_groups(records: list[ShardRecord], n_groups: int) -> list[list[ShardRecord]]:
    """Records (sorted by start) dealt round-robin into at most `n_groups` groups."""
    n_groups = max(1, min(n_groups, len(records)))
    return [records[i::n_groups] for i in range(n_groups)]


def block_batches(records: list[ShardRecord], max_rows: int) -> list[list[ShardRecord]]:
    """Consecutive records in batches of at most `max_rows` rows; a record with more rows
    than that is a batch of its own."""
    batches: list[list[ShardRecord]] = []
    rows = max_rows  # the first record opens a batch
    for record in records:
        if rows + record.rows > max_rows:
            batches.append([])
            rows = 0
        batches[-1].append(record)
        rows += record.rows
    return batches


@dataclass(frozen=True)
class ShardSpan:
    """Where one shard's rows lie in a block: rows [lo, hi) of the block."""

    shard_id: str
    lo: int
    hi: int


def read_block(
    index: GradientIndex, batch: list[ShardRecord], layers: list[str], verify: bool
) -> tuple[Block, list[ShardSpan]]:
    """The shards of `batch` as one block (phi copied once into one (n, K) float32 matrix,
    layers concatenated in `layers` order) and the span of each shard in it."""
    data = [index.read(record, layers=layers, verify=verify) for record in batch]
    widths = [data[0].phi[name].shape[1] for name in layers]
    n = sum(len(d.row_ids) for d in data)
    phi = np.empty((n, sum(widths)), np.float32)
    spans, lo = [], 0
    for record, d in zip(batch, data, strict=True):
        hi = lo + len(d.row_ids)
        col = 0
        for name, width in zip(layers, widths, strict=True):
            phi[lo:hi, col : col + width] = d.phi[name]
            col += width
        spans.append(ShardSpan(record.shard_id, lo, hi))
        lo = hi
    rows = np.concatenate([d.row_ids for d in data])
    keys = [key for d in data for key in d.keys]
    return Block(rows, keys, torch.from_numpy(phi), spans[0].shard_id), spans


def score_records(
    index: GradientIndex,
    records: list[ShardRecord],
    query: QuerySide,
    opts: ScoreOptions,
    whiteners: dict[str, torch.Tensor] | None = None,
    dense_dir: str | None = None,
    fault: KillOnce | None = None,
    diag_dir: str | None = None,
) -> tuple[ScorePartial, dict[str, list[str]]]:
    """Score every row of `records` in this process -> (partial, parts); the partial
    carries the train keys of the rows it ranks (`ScorePartial.train_keys`).

    parts: {"dense": dense part paths (under dense_dir), "self_influence": one part per
    shard (under diag_dir, written when whiteners are given)}. A dense part holds one
    shard's rows of one tile, named by the shard and the part's first row in it.
    """
    layers = [name for name, _, _ in query.layers]
    out = _Parts(index, dense_dir, diag_dir, fault)

    def blocks() -> Iterator[Block]:
        for batch in block_batches(records, min(opts.tile_rows, _BLOCK_ROWS)):
            block, out.spans = read_block(index, batch, layers, opts.verify)
            if len(out.seen) + len(block.rows) <= _KEPT_KEYS:
                out.seen.update(zip(block.rows.tolist(), block.keys, strict=True))
            yield block
            if fault is not None:
                fault.reached("after_shard")

    partial = score_stream(
        query,
        blocks,
        opts.topk,
        opts.tile_rows,
        expected_rows=sum(r.rows for r in records),
        whiteners=whiteners,
        dense_sink=out.dense if dense_dir else None,
        diag_sink=out.diag if diag_dir else None,
    )
    partial.train_keys = _ranked_keys(index, records, partial.rows(), out.seen, opts.verify)
    return partial, {"dense": out.dense_files, "self_influence": out.diag_files}


class _Parts:
    """The per-shard result parts of one scorer's blocks, written as `score_stream` hands
    over each block's scores (`dense`) and self-influence (`diag`): `spans` are the shards
    of the block being scored, and `seen` the train keys of the rows read (up to
    `_KEPT_KEYS`)."""

    def __init__(
        self,
        index: GradientIndex,
        dense_dir: str | None,
        diag_dir: str | None,
        fault: KillOnce | None,
    ):
        self.index, self.dense_dir, self.diag_dir, self.fault = index, dense_dir, diag_dir, fault
        self.spans: list[ShardSpan] = []
        self.seen: dict[int, str] = {}
        self.dense_files: list[str] = []
        self.diag_files: list[str] = []

    def dense(self, block: Block, start: int, rows: np.ndarray, scores: torch.Tensor) -> None:
        """The scores of block columns [start, start + len(rows)), one part per shard in them."""
        end = start + len(rows)
        for span in self.spans:
            lo, hi = max(span.lo, start), min(span.hi, end)
            if lo >= hi:
                continue
            part = scores[:, lo - start : hi - start].numpy()
            shard_rows = rows[lo - start : hi - start]
            self.dense_files.append(
                results.write_dense_part(
                    self.index, self.dense_dir, span.shard_id, lo - span.lo, shard_rows, part
                )
            )
            if self.fault is not None:
                self.fault.reached("after_dense_part")

    def diag(self, block: Block, self_inf: np.ndarray, norm_sq: np.ndarray) -> None:
        """The block's self-influence and squared norms, one part per shard."""
        for span in self.spans:
            part = slice(span.lo, span.hi)
            self.diag_files.append(
                results.write_self_influence_part(
                    self.index,
                    self.diag_dir,
                    span.shard_id,
                    block.rows[part],
                    block.keys[part],
                    self_inf[part],
                    norm_sq[part],
                )
            )


def _ranked_keys(
    index: GradientIndex,
    records: list[ShardRecord],
    rows: np.ndarray,
    seen: dict[int, str],
    verify: bool,
) -> TrainKeys:
    """Keys of `rows` (sorted, unique): those `seen`, the rest read back from `records`."""
    kept = np.fromiter((r in seen for r in rows.tolist()), bool, len(rows))
    keys = rows[kept], pa.array([seen[r] for r in rows[kept].tolist()], pa.string())
    if kept.all():
        return keys
    return join_keys(keys, keys_of(index, records, rows[~kept], verify))


def _executor(opts: ScoreOptions, ex: Executor | None) -> Executor:
    """`ex` (e.g. lent workers), else Ray tasks as `opts` asks."""
    return ex or Executor((), opts.max_retries, opts.fresh_process)


def fan_out(
    index: GradientIndex,
    records: list[ShardRecord],
    query: QuerySide,
    opts: ScoreOptions,
    parallelism: int,
    whiteners: dict[str, torch.Tensor] | None = None,
    dense_dir: str | None = None,
    fault: KillOnce | None = None,
    diag_dir: str | None = None,
    ex: Executor | None = None,
) -> tuple[ScorePartial, dict[str, list[str]]]:
    """Score `records` with up to `parallelism` calls of `ex` (default: Ray tasks) ->
    (merged partial, with the train keys of the rows it ranks; parts, as in
    `score_records`, gathered over the calls)."""
    files: dict[str, list[str]] = {"dense": [], "self_influence": []}
    if not records:
        empty = TileScorer(query, opts.topk, opts.tile_rows, whiteners).finish()
        empty.train_keys = np.zeros(0, np.int64), pa.array([], pa.string())
        return empty, files
    ex = _executor(opts, ex)
    q_ref, w_ref = ex.share(query), ex.share(whiteners)  # shared once, not per call
    refs = [
        ex.submit(
            i,
            score_records,
            index,
            group,
            q_ref,
            opts,
            w_ref,
            dense_dir,
            fault,
            diag_dir,
            cpus=opts.cpus_per_task,
        )  # fmt: skip
        for i, group in enumerate(shard_groups(records, parallelism))
    ]
    merged = None
    for ref in refs:  # one partial at a time, in submission order
        partial, parts = ex.get(ref)
        merged = partial if merged is None else merged.merge(partial)
        for kind, paths in parts.items():
            files[kind].extend(paths)
        del partial
    return merged, files


def keys_of(
    index: GradientIndex, records: list[ShardRecord], rows: np.ndarray, verify: bool = True
) -> tuple[np.ndarray, pa.Array]:
    """Train keys of `rows` (any shape, int64; -1 entries ignored) found in `records`.

    Returns (sorted unique rows (u,) int64, their keys (u,) string). Reads only the shards
    that hold one of the rows, one at a time and without their gradients.
    """
    wanted = np.unique(rows[rows >= 0])
    out_rows, out_keys = [], []
    for record in records:
        lo, hi = np.searchsorted(wanted, [record.start, record.end])
        if lo == hi:
            continue
        data = index.read(record, layers=[], verify=verify)
        order = np.argsort(data.row_ids, kind="stable")
        want = wanted[lo:hi]
        pos = order[np.searchsorted(data.row_ids[order], want).clip(0, len(order) - 1)]
        found = data.row_ids[pos] == want
        out_rows.append(want[found])
        out_keys.append(pa.array(data.keys, pa.string()).take(pa.array(pos[found])))
    if not out_rows:
        return np.zeros(0, np.int64), pa.array([], pa.string())
    rows_out = np.concatenate(out_rows)
    order = np.argsort(rows_out, kind="stable")
    keys = pa.concat_arrays(out_keys).take(pa.array(order))
    return rows_out[order], keys


def breakdown_records(
    index: GradientIndex,
    records: list[ShardRecord],
    query: QuerySide,
    rows: np.ndarray,
    verify: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer score terms of the pairs (query q, train rows[q, j]) found in `records`.

    rows: (Q, m) int64 (-1 = no pair). Returns (flat positions into rows (n,) int64,
    terms (n, L) float32); each pair appears once, from the shard that holds its row.
    """
    layers = [name for name, _, _ in query.layers]
    flat = rows.reshape(-1)
    out_pos, out_val = [], []
    for record in records:
        pos = np.nonzero((flat >= record.start) & (flat < record.end))[0]
        if len(pos) == 0:
            continue
        data = index.read(record, layers=layers, verify=verify)
        phi = concat(data.phi)
        order = np.argsort(data.row_ids, kind="stable")
        local = order[np.searchsorted(data.row_ids[order], flat[pos]).clip(0, len(order) - 1)]
        found = data.row_ids[local] == flat[pos]
        pos, local = pos[found], local[found]
        for lo in range(0, len(pos), _PAIR_CHUNK):
            q_index = torch.from_numpy(pos[lo : lo + _PAIR_CHUNK] // rows.shape[1])
            terms = layer_scores(query, q_index, phi[local[lo : lo + _PAIR_CHUNK]])
            out_val.append(terms.numpy())
        out_pos.append(pos)
    if not out_pos:
        return np.zeros(0, np.int64), np.zeros((0, len(layers)), np.float32)
    return np.concatenate(out_pos), np.concatenate(out_val)


def fan_out_breakdown(
    index: GradientIndex,
    records: list[ShardRecord],
    query: QuerySide,
    rows: np.ndarray,
    opts: ScoreOptions,
    parallelism: int,
    ex: Executor | None = None,
) -> np.ndarray:
    """Per-layer terms (Q, m, L) float32 of every pair in `rows` (Q, m); zeros where -1."""
    out = np.zeros((rows.size, len(query.layers)), np.float32)
    if not records:
        return out.reshape(*rows.shape, -1)
    ex = _executor(opts, ex)
    q_ref, r_ref = ex.share(query), ex.share(rows)
    refs = [
        ex.submit(
            i, breakdown_records, index, group, q_ref, r_ref, opts.verify, cpus=opts.cpus_per_task
        )
        for i, group in enumerate(shard_groups(records, parallelism))
    ]
    for ref in refs:
        pos, terms = ex.get(ref)
        out[pos] = terms
    return out.reshape(*rows.shape, -1)
