"""The reducer: builds the preconditioner and serves all-pairs scoring from the index.

Both are map-reduces over committed shards, run as Ray tasks or on the job's idle workers
(`runtime.executors`): the preconditioner's in `runtime.fisher` (`build_fisher`, and
`layer_map` for factorising a stored one), the scores' in `runtime.scoring`. Everything
it produces is written to the index store; the actor itself is only a cache of the loaded
artifacts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grass_dist.config import FaultsConfig, JobConfig
from grass_dist.errors import CorruptPreconditionerError, PreconditionerNotFoundError
from grass_dist.gradients.computer import PhiBlock
from grass_dist.index import GradientIndex
from grass_dist.index.manifest import ShardRecord
from grass_dist.index.retry import RetryPolicy
from grass_dist.runtime.cluster import resources as cluster_resources
from grass_dist.runtime.executors import Executor
from grass_dist.runtime.faults import FaultInjector, KillOnce
from grass_dist.runtime.fisher import build_fisher, fisher_source, layer_map
from grass_dist.runtime.scoring import (
    ScoreOptions,
    fan_out,
    fan_out_breakdown,
)
from grass_dist.scoring import results
from grass_dist.scoring.precondition import Preconditioner, stored_source
from grass_dist.scoring.score import QuerySide, ScorePartial, prepare_queries, whiteners_for
from grass_dist.scoring.topk import decode

log = logging.getLogger(__name__)

_FRESH_PROCESS_BYTES = 1 << 28


def preconditioner_path(name: str) -> str:
    return f"preconditioner/{name}.safetensors"


def read_preconditioner(index: GradientIndex, name: str) -> Preconditioner:
    """The index's stored preconditioner `name`: PreconditionerNotFoundError when it holds
    none, CorruptPreconditionerError naming the file and the fix when that file is damaged."""
    path = preconditioner_path(name)
    if not index.has_artifact(path):
        raise PreconditionerNotFoundError(
            f"no preconditioner {name!r} in the index: run `python -m jobs.attribute` "
            f"or build it with the precondition stage first"
        )
    try:
        return Preconditioner.from_bytes(index.get_artifact(path))
    except CorruptPreconditionerError as exc:
        raise CorruptPreconditionerError(
            f"{_damaged(index, path, exc)}. Fix: run the job's precondition stage again "
            f"(python -m jobs.attribute or jobs.score with the same settings, or the Python "
            f"API's attribute), which builds a damaged preconditioner again from the index"
        ) from None


def _damaged(index: GradientIndex, path: str, why: Exception) -> str:
    return f"the preconditioner {index.store.url_of(path)} is damaged: {why}"


@dataclass(frozen=True)
class ScoreRequest:
    """Everything one scoring run needs besides the query phi (from the job's config)."""

    result_name: str  # run.name: the result set written under results/
    precondition_name: str
    damping: float  # relative delta; 'auto' is resolved to a number before scoring
    kind: str  # influence | grad_dot | cosine
    topk: int
    dense: bool
    self_influence: bool
    tile_rows: int
    verify: bool = True
    breakdown: bool = False
    parallelism: int | None = None  # scorer tasks; None = cluster CPUs / cpus_per_task
    cpus_per_task: float = 1.0
    max_retries: int = 3

    def fresh_process(self, n_queries: int) -> bool:
        """Whether each scorer task should end its process (large top-k state: returns the
        memory); only tasks can, so such a stage never runs on lent workers."""
        return n_queries * self.topk * 64 > _FRESH_PROCESS_BYTES

    def options(self, n_queries: int) -> ScoreOptions:
        """How each scorer call runs, for `n_queries` queries."""
        return ScoreOptions(
            self.topk, self.tile_rows, self.verify, self.cpus_per_task, self.max_retries,
            self.fresh_process(n_queries),
        )  # fmt: skip

    def scorer_calls(self) -> int:
        """`parallelism`, by default the cluster's CPUs / `cpus_per_task`."""
        if self.parallelism is not None:
            return self.parallelism
        return max(1, int(cluster_resources().get("CPU", 1) // self.cpus_per_task))

    @classmethod
    def of(cls, job: JobConfig) -> ScoreRequest:
        sc = job.scoring
        return cls(
            job.run.name,
            job.precondition.name,
            job.precondition.damping,
            sc.kind,
            sc.topk,
            sc.dense,
            sc.self_influence,
            sc.tile_rows,
            job.index.verify,
            sc.breakdown,
            sc.parallelism,
            sc.cpus_per_task,
            job.cluster.max_shard_retries,
        )


def _topk_tables(
    index: GradientIndex,
    records: list[ShardRecord],
    query: PhiBlock,
    prepared: QuerySide,
    merged: ScorePartial,
    breakdown: tuple[ScoreOptions, int, Executor] | None,
) -> dict[str, Any]:
    """The proponent and opponent tables of the scorers' `merged` partial; with `breakdown`
    (options, parallelism, executor) each ranked pair's per-layer terms too, computed by
    scorer calls that read the ranked rows again. The ranked rows' keys came with the
    partials, from the scorers' reads."""
    ranked = {
        name: tuple(x.numpy() for x in decode(keys, sign))
        for name, keys, sign in (
            ("proponent", merged.proponents, 1),
            ("opponent", merged.opponents, -1),
        )
    }
    terms = None
    if breakdown is not None:
        layers = [name for name, _, _ in prepared.layers]
        terms = {}
        for name, (_, rows) in ranked.items():
            per_layer = fan_out_breakdown(index, records, prepared, rows, *breakdown)  # (Q, k, L)
            terms[name] = {layer: per_layer[..., j] for j, layer in enumerate(layers)}
    return results.topk_tables(query.row_ids, query.keys, ranked, merged.train_keys, terms)


def _ran_on(workers: Sequence[Any], inline: bool) -> str:
    """Where a stage's map calls ran, for its summary."""
    if inline:
        return "the driver"
    if not workers:
        return "ray tasks"
    return f"{len(workers)} lent worker{'s' if len(workers) > 1 else ''}"


class Reducer:
    """One per job; `parallelism` is how many map calls it fans out to.

    The driver starts a new reducer when one dies; it resumes from the store (the saved
    preconditioner, the committed shards), since this actor holds nothing else. With
    `inline` it is an object of the driver's instead (a small index, `reduces_in_driver`),
    which makes the same map calls in its own process.
    """

    def __init__(
        self,
        index_url: str,
        storage_options: dict,
        parallelism: int = 4,
        retry: RetryPolicy | None = None,
        faults: FaultsConfig | None = None,
        inline: bool = False,
    ):
        self.index = GradientIndex.open(index_url, storage_options, retry)
        self.parallelism = parallelism
        self.inline = inline
        self.cached: dict[str, Preconditioner] = {}
        self.faults = FaultInjector(faults or FaultsConfig(), self.index.store)

    def _executor(
        self, workers: Sequence[Any], max_retries: int = 3, fresh: bool = False
    ) -> Executor:
        """Where a stage's map calls run: here (inline), on lent `workers`, or Ray tasks."""
        return Executor(workers, max_retries, fresh, inline=self.inline)

    def build_preconditioner(
        self,
        name: str,
        verify: bool = True,
        damping: float | str | None = None,
        workers: Sequence[Any] = (),
    ) -> dict[str, Any]:
        """Sum phi^T phi over every committed shard; with a numeric `damping` factorise every
        layer's H + lambda I (Cholesky, layers in parallel); save to the store. The map calls
        run on `workers` when the driver lends its idle workers, else as Ray tasks."""
        t0 = time.perf_counter()
        delta = float(damping) if isinstance(damping, int | float) else None
        path, source = preconditioner_path(name), fisher_source(self.index.committed().values())
        pre = self._reusable(name, path, source)
        reused = pre is not None
        if reused:  # summed from the very shards committed now: no pass over the index
            self.faults.reducer("precondition")
            log.info("preconditioner %r: reused, built from the shards committed now", name)
        else:
            ex = self._executor(workers)
            pre = build_fisher(self.index, self.parallelism, verify, delta, ex)
            self.faults.reducer("precondition")
            self.index.put_artifact(path, pre.to_buffer())
            self.cached[name] = pre
        return {
            "rows": pre.n,
            "layers": {n: f.trace for n, f in pre.layers.items()},
            "seconds": time.perf_counter() - t0,
            "ran_on": "store (reused)" if reused else _ran_on(workers, self.inline),
            "reused": reused,
        }

    def _reusable(self, name: str, path: str, source: str) -> Preconditioner | None:
        """The stored preconditioner `name` when it was summed from `source` (the shards
        committed now) and is intact; None when it must be built: none stored, another
        source, or a damaged file (built again, with a warning)."""
        if not self.index.has_artifact(path):
            return None
        try:
            with self.index.store.open(path) as f:
                if stored_source(f) != source:
                    return None
            if name not in self.cached or self.cached[name].source != source:
                self.cached[name] = Preconditioner.from_bytes(self.index.get_artifact(path))
            return self.cached[name]
        except CorruptPreconditionerError as exc:
            self.cached.pop(name, None)
            log.warning("%s; building it again from the index", _damaged(self.index, path, exc))
            return None

    def load_preconditioner(self, name: str) -> Preconditioner:
        if name not in self.cached:
            self.cached[name] = read_preconditioner(self.index, name)
        return self.cached[name]

    def factorised(self, name: str, damping: float, ex: Executor | None = None) -> Preconditioner:
        """The preconditioner `name` with its factors at `damping` (layers in parallel calls
        of `ex` unless the store already holds them)."""
        pre = self.load_preconditioner(name).keep_factors(damping)
        return pre.factorise(damping, layer_map(self.parallelism, ex))

    def score(
        self,
        query: PhiBlock,
        req: ScoreRequest,
        fault: KillOnce | None = None,
        workers: Sequence[Any] = (),
    ) -> dict[str, Any]:
        """Score every committed train row against `query`; write results; return a summary.

        `req.parallelism` scorer calls (default: cluster CPUs / cpus_per_task) each take a
        group of shards, on `workers` when the driver lends its idle workers, else as Ray
        tasks; `fault` injects a crash for recovery tests (see runtime/faults.py).
        """
        kind, damping = req.kind, req.damping
        t0 = time.perf_counter()
        opts, parallelism = req.options(len(query.row_ids)), req.scorer_calls()
        ex = self._executor(workers, req.max_retries, opts.fresh_process)
        pre = (
            self.factorised(req.precondition_name, damping, ex)
            if kind == "influence" or req.self_influence
            else None
        )
        prepared = prepare_queries(query.phi, kind, pre, damping)
        layers = [name for name, _, _ in prepared.layers]
        records = sorted(self.index.committed().values(), key=lambda r: r.start)
        run_dir = results.new_run_dir(req.result_name)
        try:
            whiteners = whiteners_for(pre, layers, damping) if req.self_influence else None
            merged, parts = fan_out(
                self.index, records, prepared, opts, parallelism, whiteners,
                run_dir if req.dense else None, fault, run_dir if req.self_influence else None, ex,
            )  # fmt: skip
            score_seconds = time.perf_counter() - t0
            breakdown = (opts, parallelism, ex) if req.breakdown else None
            tables = _topk_tables(self.index, records, query, prepared, merged, breakdown)
            files: dict[str, Any] = {
                "topk": results.write_tables(self.index, run_dir, "topk.parquet", tables),
                **{k: sorted(parts[k]) for k in ("self_influence", "dense") if getattr(req, k)},
            }
            self.faults.reducer("score")  # files written, _COMPLETE.json not yet
            n_train = sum(r.rows for r in records)
            summary = {
                "queries": len(query.row_ids),
                "train_rows": n_train,
                "kind": kind,
                "damping": damping if pre is not None else None,  # grad_dot, cosine: unused
                "topk": req.topk,
                "scorer_tasks": min(parallelism, len(records)),
                "pairs_per_second": len(query.row_ids) * n_train / max(score_seconds, 1e-9),
                "seconds": time.perf_counter() - t0,
            }
        except Exception:  # refused (a damaged shard, NaN): remove what the run wrote
            results.abandon(self.index, run_dir)
            raise
        results.complete(self.index, req.result_name, files, summary)
        return {**summary, "files": files, "ran_on": _ran_on(workers, self.inline)}
