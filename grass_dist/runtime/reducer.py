"""The reducer: builds the preconditioner and serves all-pairs scoring from the index.

Both are map-reduces over committed shards run as Ray tasks. The preconditioner's map tasks
hand their per-layer partial sums straight to per-layer tasks that add them up and
factorise them (`build_fisher`); the layers of a stored preconditioner factorise in
parallel tasks too (`layer_map`). Everything it produces is written to the index store;
the actor itself is only a cache of the loaded artifacts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from grass_dist.assembly import retry_policy
from grass_dist.config import FaultsConfig, JobConfig
from grass_dist.errors import PreconditionerNotFoundError, ReducerFailedError
from grass_dist.gradients.computer import PhiBlock
from grass_dist.index import GradientIndex, ShardRecord
from grass_dist.index.retry import RetryPolicy
from grass_dist.runtime.cluster import map_tasks, threads_for
from grass_dist.runtime.faults import FaultInjector, KillOnce
from grass_dist.runtime.pool import ACTOR_LOST
from grass_dist.runtime.scoring import (
    ScoreOptions,
    fan_out,
    fan_out_breakdown,
    fan_out_keys,
    release_memory,
    shard_groups,
)
from grass_dist.scoring import results
from grass_dist.scoring.precondition import (
    EMPTY_INDEX,
    FisherSum,
    LayerFactor,
    LayerMap,
    Preconditioner,
    cholesky_factor,
    fisher_matrix,
)
from grass_dist.scoring.score import prepare_queries, whiteners_for
from grass_dist.scoring.topk import decode

log = logging.getLogger(__name__)

_FRESH_PROCESS_BYTES = 1 << 28


def preconditioner_path(name: str) -> str:
    return f"preconditioner/{name}.safetensors"


@ray.remote
def _fisher_task(index: GradientIndex, records: list[ShardRecord], verify: bool):
    """One map task's partial sums phi^T phi over `records`: one return per layer of the
    index, in its column order (so each goes to its own factorisation task)."""
    torch.set_num_threads(1)  # its one CPU (a user's OMP_NUM_THREADS would oversubscribe)
    total = FisherSum.accumulate(index.read(record, verify=verify).phi for record in records)
    release_memory()
    sums = tuple(total.sums[name] for name, _ in index.layers)
    return sums if len(sums) > 1 else sums[0]


@ray.remote
def _start_process() -> None:
    """Nothing: run once per map task while the reducer actor starts, so that the processes
    its map tasks will run in start and import (torch, this module) at the same time."""


@ray.remote
def _layers_task(fn: Callable, tensors: dict[str, torch.Tensor], threads: int, device: str):
    """{name: fn(tensor)} for one group of layers, computed on `device`, returned on the CPU."""
    torch.set_num_threads(threads)
    return {name: _on_cpu(fn(t.to(device))) for name, t in tensors.items()}


@ray.remote
def _factor_task(
    names: list[str], n: int, delta: float | None, threads: int, device: str, *parts: np.ndarray
) -> dict[str, LayerFactor]:
    """Each layer of `names` from its partial sums (`parts` holds every layer's in turn, in
    map-task order): H, and with a numeric `delta` the Cholesky factor of H + lambda I."""
    torch.set_num_threads(threads)
    per = len(parts) // len(names)
    out = {}
    for j, name in enumerate(names):
        layer = out[name] = LayerFactor(fisher_matrix(parts[j * per : (j + 1) * per], n))
        if delta is not None:
            # Row-major here, in parallel: LAPACK's column-major factor would be transposed
            # when the reducer packs it for the store.
            factor = cholesky_factor(layer.fisher.to(device), delta)
            layer.cholesky[delta] = factor.cpu().contiguous()
    return out


def _on_cpu(result):
    return tuple(r.cpu() for r in result) if isinstance(result, tuple) else result.cpu()


def balanced_groups(sizes: dict[str, int], n_groups: int) -> list[list[str]]:
    """Layer names in at most `n_groups` groups of about equal sum k^3 (the factorisation
    cost): largest layer first, each to the group with the least work so far."""
    groups: list[list[str]] = [[] for _ in range(min(n_groups, len(sizes)))]
    work = [0] * len(groups)
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        lightest = work.index(min(work))
        groups[lightest].append(name)
        work[lightest] += sizes[name] ** 3
    return groups


def _placement(task, n_groups: int) -> tuple[Any, int, str]:
    """(task options, torch threads, device) for `n_groups` factorisation tasks: a GPU each
    when the cluster has GPUs, else the cluster's CPUs shared out among them."""
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) >= 1:
        return task.options(num_gpus=1), threads_for(1), "cuda"
    return task, threads_for(resources.get("CPU", 1) / n_groups), "cpu"


def layer_map(parallelism: int) -> LayerMap:
    """A LayerMap that runs the layers as at most `parallelism` Ray tasks, on a GPU each
    when the cluster has GPUs, else on the CPUs shared out among the tasks."""

    def run(fn: Callable, tensors: dict[str, torch.Tensor]) -> dict:
        if not tensors:
            return {}
        groups = balanced_groups({n: t.shape[0] for n, t in tensors.items()}, parallelism)
        task, threads, device = _placement(_layers_task, len(groups))
        fn_ref = ray.put(fn)
        refs = [task.remote(fn_ref, {n: tensors[n] for n in g}, threads, device) for g in groups]
        done: dict = {}
        for part in ray.get(refs):
            done.update(part)
        return {n: done[n] for n in tensors}

    return run


def build_fisher(
    index: GradientIndex, parallelism: int, verify: bool, delta: float | None
) -> Preconditioner:
    """The preconditioner of every committed shard: map tasks (shard groups) sum
    phi^T phi, and per-layer tasks (groups of about equal k^3) add up their layers' partial
    sums and, with a numeric `delta`, factorise them. The partial sums go from task to task,
    never through this process."""
    records = sorted(index.committed().values(), key=lambda r: r.start)
    if not records:
        raise ValueError(EMPTY_INDEX)
    layers = dict(index.layers)
    groups = shard_groups(records, parallelism)
    parts: dict[str, list] = {name: [] for name in layers}
    for group in groups:  # per layer, in submission order: the same sums every run
        refs = _fisher_task.options(num_returns=len(layers)).remote(index, group, verify)
        for name, ref in zip(layers, refs if len(layers) > 1 else [refs], strict=True):
            parts[name].append(ref)
    n = sum(r.rows for r in records)
    layer_groups = balanced_groups(layers, parallelism)
    task, threads, device = _placement(_factor_task, len(layer_groups))
    refs = [
        task.remote(names, n, delta, threads, device, *(p for m in names for p in parts[m]))
        for names in layer_groups
    ]
    done: dict[str, LayerFactor] = {}
    for part in ray.get(refs):
        done.update(part)
    return Preconditioner({name: done[name] for name in layers}, n, delta)


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


def _by_layer(terms: np.ndarray, layers: list[str]) -> dict[str, np.ndarray]:
    """(Q, k, L) per-layer terms -> {layer: (Q, k)}."""
    return {name: terms[..., j] for j, name in enumerate(layers)}


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

    def build_preconditioner(
        self, name: str, verify: bool = True, damping: float | str | None = None
    ) -> dict[str, Any]:
        """Sum phi^T phi over every committed shard; with a numeric `damping` factorise every
        layer's H + lambda I (Cholesky, layers in parallel tasks); save to the store."""
        t0 = time.perf_counter()
        delta = float(damping) if isinstance(damping, int | float) else None
        pre = build_fisher(self.index, self.parallelism, verify, delta)
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

    def factorised(self, name: str, damping: float) -> Preconditioner:
        """The preconditioner `name` with its factors at `damping` (layers in parallel tasks
        unless the store already holds them)."""
        return self.load_preconditioner(name).factorise(damping, layer_map(self.parallelism))

    def score(
        self, query: PhiBlock, req: ScoreRequest, fault: KillOnce | None = None
    ) -> dict[str, Any]:
        """Score every committed train row against `query`; write results; return a summary.

        `req.parallelism` scorer tasks (default: cluster CPUs / cpus_per_task) each take a
        group of shards; `fault` injects a crash for recovery tests (see runtime/faults.py).
        """
        result_name, kind, topk, damping = req.result_name, req.kind, req.topk, req.damping
        self_influence, dense, parallelism = req.self_influence, req.dense, req.parallelism
        t0 = time.perf_counter()
        pre = (
            self.factorised(req.precondition_name, damping)
            if kind == "influence" or self_influence
            else None
        )
        prepared = prepare_queries(query.phi, kind, pre, damping)
        layers = [name for name, _, _ in prepared.layers]
        records = sorted(self.index.committed().values(), key=lambda r: r.start)
        run_dir = results.new_run_dir(result_name)
        # Large top-k state: let each scorer's process end with its task to return the memory.
        fresh = len(query.row_ids) * topk * 64 > _FRESH_PROCESS_BYTES
        opts = ScoreOptions(
            topk, req.tile_rows, req.verify, req.cpus_per_task, req.max_retries, fresh
        )
        if parallelism is None:
            parallelism = max(1, int(ray.cluster_resources().get("CPU", 1) // req.cpus_per_task))
        whiteners = whiteners_for(pre, layers, damping) if self_influence else None
        merged, parts = fan_out(
            self.index, records, prepared, opts, parallelism, whiteners,
            run_dir if dense else None, fault, run_dir if self_influence else None,
        )  # fmt: skip
        score_seconds = time.perf_counter() - t0
        ranked = {
            name: tuple(x.numpy() for x in decode(keys, sign))
            for name, keys, sign in (
                ("proponent", merged.proponents, 1),
                ("opponent", merged.opponents, -1),
            )
        }
        terms = None
        if req.breakdown:
            terms = {
                name: _by_layer(
                    fan_out_breakdown(self.index, records, prepared, rows, opts, parallelism),
                    layers,
                )
                for name, (_, rows) in ranked.items()
            }
        # Keys only for the ranked rows (at most 2 k per query), read back from the shards.
        all_ranked = np.concatenate([rows.reshape(-1) for _, rows in ranked.values()])
        train_keys = fan_out_keys(self.index, records, all_ranked, opts, parallelism)
        tables = results.topk_tables(query.row_ids, query.keys, ranked, train_keys, terms)
        files: dict[str, Any] = {
            "topk": results.write_tables(self.index, run_dir, "topk.parquet", tables)
        }
        if self_influence:
            files["self_influence"] = sorted(parts["self_influence"])
        if dense:
            files["dense"] = sorted(parts["dense"])
        self.faults.reducer("score")  # files written, _COMPLETE.json not yet
        n_train = sum(r.rows for r in records)
        summary = {
            "queries": len(query.row_ids),
            "train_rows": n_train,
            "kind": kind,
            "damping": damping,
            "topk": topk,
            "scorer_tasks": min(parallelism, len(records)),
            "pairs_per_second": len(query.row_ids) * n_train / max(score_seconds, 1e-9),
            "seconds": time.perf_counter() - t0,
        }
        results.complete(self.index, result_name, files, summary)
        return {**summary, "files": files}


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

    def start(self, reason: str) -> None:
        """Start the reducer actor now, unless one runs (a stage starts one when needed)."""
        if self.actor is None:
            self._start(reason)

    def _start(self, reason: str) -> None:
        self.started += 1
        log.info("starting reducer %d: %s", self.started, reason)
        parallelism = map_tasks(self.cfg.cluster)
        self.actor = (
            ray.remote(Reducer)
            .options(num_cpus=0, max_restarts=0)
            .remote(
                self.cfg.index_url,
                self.cfg.store.storage_options,
                parallelism,
                retry=retry_policy(self.cfg.store),
                faults=self.cfg.faults,
            )
        )
        for _ in range(parallelism):  # after the actor: it takes a process Ray started ahead
            _start_process.remote()

    def precondition(
        self, name: str, verify: bool, damping: float | str | None = None
    ) -> dict[str, Any]:
        """`Reducer.build_preconditioner`, on a new reducer if this one dies."""
        return self._retried(
            "precondition", lambda a: a.build_preconditioner.remote(name, verify, damping)
        )

    def score(self, query: PhiBlock, req: ScoreRequest) -> dict[str, Any]:
        """`Reducer.score`, on a new reducer if this one dies."""
        return self._retried("score", lambda a: a.score.remote(query, req))

    def _retried(self, stage: str, call: Callable[[Any], Any]) -> Any:
        """ray.get(call(actor)), retried on a new reducer if this one dies."""
        attempts = self.cfg.cluster.max_reducer_restarts + 1
        for attempt in range(1, attempts + 1):
            if self.actor is None:
                self._start(f"stage {stage} needs one")
            try:
                return ray.get(call(self.actor))
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
