"""The reducer: builds the preconditioner and serves all-pairs scoring from the index.

Both are map-reduces over committed shards run as Ray tasks. Everything it produces is
written to the index store; the actor itself is only a cache of the loaded artifacts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from grass_dist import results
from grass_dist.build import store_retry
from grass_dist.config import FaultsConfig, JobConfig
from grass_dist.errors import PreconditionerNotFoundError, ReducerFailedError
from grass_dist.gradients import PhiBlock
from grass_dist.index import GradientIndex, ShardRecord
from grass_dist.index.retry import RetryPolicy
from grass_dist.precondition import FisherSum, Preconditioner
from grass_dist.runtime.faults import FaultInjector
from grass_dist.runtime.pool import ACTOR_LOST
from grass_dist.score import ScorePartial, score_records

log = logging.getLogger(__name__)


def preconditioner_path(name: str) -> str:
    return f"preconditioner/{name}.safetensors"


def _groups(records: list[ShardRecord], n_groups: int) -> list[list[ShardRecord]]:
    n_groups = max(1, min(n_groups, len(records)))
    return [records[i::n_groups] for i in range(n_groups)]


@ray.remote
def _fisher_task(index: GradientIndex, records: list[ShardRecord], verify: bool) -> FisherSum:
    total = FisherSum({}, 0)
    for record in records:
        total = total + FisherSum.of(index.read(record, verify=verify).phi)
    return total


@ray.remote
def _score_task(
    index, records, query_pre, topk, preconditioner, delta, tile_rows, verify, dense_name
) -> tuple[ScorePartial, list[str]]:
    dense_files: list[str] = []

    def sink(record: ShardRecord, rows: np.ndarray, scores: np.ndarray) -> None:
        dense_files.append(
            results.write_dense_part(index, dense_name, record.shard_id, rows, scores)
        )

    partial = score_records(
        index,
        records,
        query_pre,
        topk,
        preconditioner=preconditioner,
        delta=delta,
        tile_rows=tile_rows,
        verify=verify,
        dense_sink=sink if dense_name else None,
    )
    return partial, dense_files


class Reducer:
    """One per job; `parallelism` is how many map tasks it fans out to.

    The driver starts a new reducer when one dies; it resumes from the store (the saved
    preconditioner, the committed shards), since this actor holds nothing else.
    """

    def __init__(
        self,
        index_url: str,
        storage_options: dict,
        parallelism: int = 4,
        retry: RetryPolicy | None = None,
        faults: FaultsConfig | None = None,
    ):
        self.index = GradientIndex.open(index_url, storage_options, retry)
        self.parallelism = parallelism
        self.cached: dict[str, Preconditioner] = {}
        self.faults = FaultInjector(faults or FaultsConfig(), self.index.store)

    def build_preconditioner(self, name: str, verify: bool = True) -> dict[str, Any]:
        """Sum phi^T phi over every committed shard, eigendecompose, save to the store."""
        t0 = time.perf_counter()
        records = sorted(self.index.committed().values(), key=lambda r: r.start)
        refs = [
            _fisher_task.remote(self.index, g, verify) for g in _groups(records, self.parallelism)
        ]
        total = FisherSum({}, 0)
        for part in ray.get(refs):  # summed in submission order: same answer every run
            total = total + part
        pre = Preconditioner.from_fisher(total)
        self.faults.reducer("precondition")
        self.index.put_artifact(preconditioner_path(name), pre.to_bytes())
        self.cached[name] = pre
        return {
            "rows": pre.n,
            "layers": {n: f.trace for n, f in pre.layers.items()},
            "seconds": time.perf_counter() - t0,
        }

    def load_preconditioner(self, name: str) -> Preconditioner:
        if name not in self.cached:
            path = preconditioner_path(name)
            if not self.index.has_artifact(path):
                raise PreconditionerNotFoundError(
                    f"no preconditioner {name!r} in the index: run `python -m jobs.attribute` "
                    f"or build it with the precondition stage first"
                )
            self.cached[name] = Preconditioner.from_bytes(self.index.get_artifact(path))
        return self.cached[name]

    def score(
        self,
        result_name: str,
        query: PhiBlock,
        *,
        precondition_name: str,
        damping: float,
        kind: str,
        topk: int,
        dense: bool,
        self_influence: bool,
        tile_rows: int,
        verify: bool = True,
    ) -> dict[str, Any]:
        """Score every committed train row against `query`; write results; return a summary."""
        t0 = time.perf_counter()
        pre = self.load_preconditioner(precondition_name)
        query_pre = pre.precondition_queries(query.phi, damping, kind)
        records = sorted(self.index.committed().values(), key=lambda r: r.start)
        q_ref = ray.put(query_pre)  # shared once through the object store
        pre_ref = ray.put(pre) if self_influence else None
        refs = [
            _score_task.remote(
                self.index,
                g,
                q_ref,
                topk,
                pre_ref,
                damping,
                tile_rows,
                verify,
                result_name if dense else None,
            )
            for g in _groups(records, self.parallelism)
        ]
        merged, dense_files = None, []
        for partial, files in ray.get(refs):
            merged = partial if merged is None else merged.merge(partial)
            dense_files.extend(files)
        files: dict[str, Any] = {
            "topk": results.write_table(
                self.index, result_name, "topk.parquet", self._topk_table(merged, query, records)
            )
        }
        if self_influence:
            order = np.argsort(merged.self_rows, kind="stable")
            files["self_influence"] = results.write_table(
                self.index,
                result_name,
                "self_influence.parquet",
                pa.table(
                    {
                        "train_row": pa.array(merged.self_rows[order], pa.int64()),
                        "train_key": pa.array([merged.self_keys[i] for i in order], pa.string()),
                        "self_influence": pa.array(merged.self_influence[order], pa.float64()),
                    }
                ),
            )
        if dense:
            files["dense"] = sorted(dense_files)
        self.faults.reducer("score")  # files written, _COMPLETE.json not yet
        summary = {
            "queries": len(query.row_ids),
            "train_rows": sum(r.rows for r in records),
            "kind": kind,
            "damping": damping,
            "seconds": time.perf_counter() - t0,
        }
        results.complete(self.index, result_name, files, summary)
        return {**summary, "files": files}

    def _topk_table(
        self, merged: ScorePartial, query: PhiBlock, records: list[ShardRecord]
    ) -> pa.Table:
        cols: dict[str, list] = {
            k: [] for k in ("query_row", "query_key", "rank", "kind", "train_row", "score")
        }
        for label, top in (("proponent", merged.proponents), ("opponent", merged.opponents)):
            rows, vals = top.rows.numpy(), top.values.numpy()
            for q in range(rows.shape[0]):
                keep = rows[q] >= 0
                n = int(keep.sum())
                cols["query_row"] += [int(query.row_ids[q])] * n
                cols["query_key"] += [query.keys[q]] * n
                cols["rank"] += list(range(n))
                cols["kind"] += [label] * n
                cols["train_row"] += rows[q][keep].tolist()
                cols["score"] += vals[q][keep].tolist()
        keys = self._train_keys(set(cols["train_row"]), records)
        table = pa.table(cols)
        return table.append_column(
            "train_key", pa.array([keys[r] for r in cols["train_row"]], pa.string())
        )

    def _train_keys(self, rows: set[int], records: list[ShardRecord]) -> dict[int, str]:
        keys: dict[int, str] = {}
        for record in records:
            if any(record.start <= r < record.end for r in rows):
                data = self.index.read(record, layers=[], verify=False)
                keys.update(zip(data.row_ids.tolist(), data.keys, strict=True))
        return keys


class ReducerHandle:
    """Driver side of the reducer: starts the actor, and a new one when it dies mid-stage.

    A stage retried on a new reducer starts again from the store: the committed shards, and
    the saved preconditioner when scoring. Results become visible only through their
    `_COMPLETE.json`, so a reducer that dies mid-write leaves nothing half-read.
    """

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.actor: Any = None
        self.started = 0

    def _start(self, reason: str) -> None:
        self.started += 1
        log.info("starting reducer %d: %s", self.started, reason)
        self.actor = (
            ray.remote(Reducer)
            .options(num_cpus=0, max_restarts=0)
            .remote(
                self.cfg.index_url,
                self.cfg.store.storage_options,
                max(2, self.cfg.cluster.num_workers),
                retry=store_retry(self.cfg),
                faults=self.cfg.faults,
            )
        )

    def call(self, stage: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """`Reducer.<method>(*args, **kwargs)`, retried on a new reducer if this one dies."""
        attempts = self.cfg.cluster.max_reducer_restarts + 1
        for attempt in range(1, attempts + 1):
            if self.actor is None:
                self._start(f"stage {stage} needs one")
            try:
                return ray.get(getattr(self.actor, method).remote(*args, **kwargs))
            except ACTOR_LOST as e:
                self.actor = None
                if attempt == attempts:
                    raise ReducerFailedError(
                        f"the reducer died {attempts} times during stage {stage} "
                        f"({type(e).__name__}); check the reducer's logs, or raise "
                        "cluster.max_reducer_restarts"
                    ) from e
                log.warning(
                    "retrying stage %s on a new reducer (attempt %d of %d): the reducer died "
                    "(%s); it resumes from the store",
                    stage,
                    attempt + 1,
                    attempts,
                    type(e).__name__,
                )
        raise AssertionError("unreachable")

    def shutdown(self) -> None:
        if self.actor is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.actor, no_restart=True)
            self.actor = None
