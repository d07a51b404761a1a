"""The driver: validate, plan shards, run the stages on Ray, report.

Every check that can fail (config, store, fingerprint) runs in `prepare`, before Ray
starts or any gradient is computed.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omegaconf import DictConfig

from grass_dist import assembly
from grass_dist.build import (
    build_dataset,
    build_model,
    build_task,
    check_compressors,
    check_rows,
    fingerprint,
)
from grass_dist.config import JobConfig, resolve
from grass_dist.data.content import row_digest
from grass_dist.data.identity import check_committed_content, check_committed_rows
from grass_dist.fidelity import damping
from grass_dist.gradients.computer import PhiBlock
from grass_dist.gradients.learned_state import save_states
from grass_dist.index import GradientIndex
from grass_dist.models.state import state_hash
from grass_dist.runtime import repair
from grass_dist.runtime.cluster import connect, map_tasks, start_worker_pool
from grass_dist.runtime.pool import ActorPool
from grass_dist.runtime.progress import JobProgress
from grass_dist.runtime.reducer import ReducerHandle, ScoreRequest
from grass_dist.runtime.scheduler import run_items
from grass_dist.runtime.worker import ShardPlan, ShardResult, plan_shards
from grass_dist.scoring import results

log = logging.getLogger("grass_dist")


def new_job_id() -> str:
    """Sortable and unique: names this run's progress record."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class Job:
    """A validated job with its driver-side model and the index it writes to."""

    cfg: JobConfig
    raw: dict[str, Any]
    model_hash: str
    fingerprint: dict[str, Any]
    n_train: int
    timings: dict[str, float] = field(default_factory=dict)
    whole_layers: list[str] = field(default_factory=list)
    skipped_records: int = 0  # bad training records left out on data.train.on_bad_record=skip
    index: GradientIndex | None = None
    job_id: str = field(default_factory=new_job_id)
    progress: JobProgress | None = None
    _pool: ActorPool | None = None
    _reducer: ReducerHandle | None = None

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        if self.progress is not None:
            self.progress.begin(name)
        try:
            yield
        except BaseException as e:
            if self.progress is not None:
                self.progress.end(name, time.perf_counter() - t0, e)
            raise
        self.timings[name] = time.perf_counter() - t0
        if self.progress is not None:
            self.progress.end(name, self.timings[name])
        log.info("stage %s took %.2f s", name, self.timings[name])


def prepare(cfg: DictConfig | dict, *, create_index: bool = True, query: bool = False) -> Job:
    """Validate everything and open (or create) the index; no Ray, no gradients.

    The checks run in order of cost, and all of them before the first write to the store:
    config, model, task, data (non-empty, row 0 through the task and model; data.query too
    when `query` or configured), layers and compressors, then the store. Only then may
    learned masks be fitted.
    """
    raw = resolve(cfg)
    job_cfg = JobConfig.from_cfg(raw)
    model = build_model(job_cfg)
    task = build_task(job_cfg)
    train = build_dataset(job_cfg, "train")
    check_rows(job_cfg, model, task, train, "train")
    row_digest(train[0])  # ConfigError now for items without a stable content digest
    if query or job_cfg.data.get("query") is not None:
        # A missing, empty or unfitting query set fails here, not after the index build.
        check_rows(job_cfg, model, task, build_dataset(job_cfg, "query"), "query")
    whole = check_compressors(job_cfg, model)
    if whole:
        log.info(
            "keeping layers %s whole (exact gradients): each has at most compression.k=%d "
            "entries (compression.whole_small_layers=true)",
            whole,
            job_cfg.compression.k,
        )
    if not create_index:
        assembly.open_index(job_cfg)  # IndexNotFoundError before fitting
    store = assembly.open_store(job_cfg)
    store.check_writable()
    compressors = assembly.driver_compressors(job_cfg, model, task, train)
    fp = fingerprint(job_cfg, model, compressors, task, train)
    if create_index:
        save_states(store, compressors)  # learned masks, before the index that names them
    index = assembly.checked_index(job_cfg, fp) if create_index else assembly.open_index(job_cfg)
    if not create_index:
        assembly.checked_index(job_cfg, fp)  # refuses a mismatch
    check_committed_rows(index, train)  # growing data.train is fine, changing it is not
    if create_index:  # a job that adds shards must add them to the same data
        check_committed_content(index, train)
    job = Job(
        job_cfg,
        raw,
        state_hash(model),
        fp,
        len(train),
        index=index,
        whole_layers=whole,
        skipped_records=getattr(train, "skipped_records", 0),
    )
    job.progress = JobProgress(index.store, job.job_id, job_cfg.cluster.progress_interval_s)
    return job


def _pool(job: Job) -> ActorPool:
    """The worker pool, started on first use; waits until one worker is ready (the others
    join as they are placed)."""
    if job._pool is None:
        connect(job.cfg.cluster)
        objects = assembly.ship(job.raw)  # in-memory model/task/data, once per pool
        job._pool = start_worker_pool(job.cfg.cluster, job.raw, job.model_hash, objects)
        job._pool.wait_ready(1)
    return job._pool


def release_workers(job: Job) -> None:
    """Stop the worker pool so its CPUs/GPUs go to the reducer's map tasks."""
    if job._pool is not None:
        job._pool.shutdown()
        job._pool = None


def _reducer(job: Job) -> ReducerHandle:
    if job._reducer is None:
        connect(job.cfg.cluster)
        job._reducer = ReducerHandle(job.cfg)
    return job._reducer


def run_index(job: Job, max_shards: int | None = None) -> dict[str, Any]:
    """Compute and commit every shard not yet committed (at most `max_shards` of them)."""
    committed = job.index.committed()
    plans = plan_shards(job.n_train, job.cfg.index.shard_size, committed)
    skipped = len(committed)
    if max_shards is not None:
        plans = plans[:max_shards]
    rows = sum(p.rows for p in plans)
    log.info(
        "index: %d shards to compute, skipping %d already committed (resume) in %s; progress in %s",
        len(plans),
        skipped,
        job.index.store.url_of(""),
        job.index.store.url_of(job.progress.path),
    )
    if not plans:
        job.progress.index_plan(skipped, skipped, job.n_train, 0)
        return {"computed_shards": 0, "skipped_shards": skipped, "rows": 0}
    with job.stage("start_workers"):
        pool = _pool(job)
    with job.stage("index"):
        job.progress.index_plan(len(plans) + skipped, skipped, job.n_train, rows)

        def commit(batch: list[tuple[ShardPlan, ShardResult]]) -> None:
            version = job.index.commit([res.record for _, res in batch])
            done = ", ".join(f"{p.shard_id} (worker {r.worker_id})" for p, r in batch)
            log.debug("committed %s in manifest version %d", done, version)
            job.progress.shards_done(
                sum(p.rows for p, _ in batch), [res.node_id for _, res in batch]
            )

        run_items(
            pool,
            plans,
            lambda a, p: a.index_shard.remote(p),
            commit,
            describe=lambda p: f"shard {p.shard_id}",
            max_inflight=job.cfg.cluster.max_inflight_per_worker,
            max_retries=job.cfg.cluster.max_shard_retries,
            on_tick=job.progress.tick,
        )
    return {"computed_shards": len(plans), "skipped_shards": skipped, "rows": rows}


def run_repair(job: Job) -> dict[str, Any]:
    """Check every committed shard; recompute and re-commit only the bad ones."""
    with job.stage("repair"):
        connect(job.cfg.cluster)
        committed, bad = repair.scan(job.index, map_tasks(job.cfg.cluster))
        log.info("repair: %d committed shards checked, %d bad", len(committed), len(bad))
        fixed = (
            repair.recompute(job.index, _pool(job), [committed[s] for s in bad], job.cfg.cluster)
            if bad
            else {}
        )
    return {"checked_shards": len(committed), "bad_shards": bad, "recomputed": fixed}


def run_precondition(job: Job) -> dict[str, Any]:
    with job.stage("precondition"):
        p = job.cfg.precondition
        return _reducer(job).precondition(p.name, job.cfg.index.verify, p.damping)


def query_phi(job: Job, which: str = "query") -> PhiBlock:
    """phi of every row of data.<which>, from the worker pool with the index's compressors."""
    n = len(build_dataset(job.cfg, which))
    chunk = job.cfg.index.shard_size
    spans = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    blocks: dict[tuple[int, int], PhiBlock] = {}
    with job.stage(f"{which}_gradients"):
        run_items(
            _pool(job),
            spans,
            lambda a, s: a.phi.remote(which, *s),
            blocks.update,
            describe=lambda s: f"{which} rows {s[0]}..{s[1]}",
            max_inflight=job.cfg.cluster.max_inflight_per_worker,
            max_retries=job.cfg.cluster.max_shard_retries,
        )
    parts = [blocks[s] for s in spans]
    return PhiBlock(
        np.concatenate([p.row_ids for p in parts]),
        [k for p in parts for k in p.keys],
        {name: np.concatenate([p.phi[name] for p in parts]) for name in parts[0].phi},
    )


def run_score(job: Job, query: PhiBlock | None = None) -> dict[str, Any]:
    """Score `query` (default: data.query) against the whole index; write results."""
    if query is None:
        query = query_phi(job)
        release_workers(job)  # the scorer tasks need the workers' CPUs
    with job.stage("score"):
        return _reducer(job).score(query, ScoreRequest.of(job.cfg))


def members_of(jobs: list[Job], queries: list[PhiBlock]) -> list[damping.Member]:
    return [
        damping.Member(
            j.index, damping.load_preconditioner(j.index, j.cfg.precondition.name), q, j.cfg
        )
        for j, q in zip(jobs, queries, strict=True)
    ]


def select_damping(jobs: list[Job], queries: list[PhiBlock], cfg: JobConfig) -> dict | None:
    """With damping=auto: choose delta for all `jobs` and set it on each; else None."""
    if cfg.precondition.damping != "auto":
        return None
    selection = damping.choose(members_of(jobs, queries), cfg, jobs[0].n_train)
    selection["validation"] = cfg.precondition.validation
    selection["validation_seed"] = cfg.precondition.validation_seed
    for job in jobs:
        job.cfg.precondition.damping = selection["chosen"]
    return selection


def record_selection(where: Any, name: str, selection: dict[str, Any]) -> None:
    """Add the damping choice to the summary of the complete result set `name`."""
    done = results.manifest(where, name)
    results.complete(
        where, name, done["files"], {**done["summary"], "damping_selection": selection}
    )


def score_stage(job: Job, query: PhiBlock) -> dict[str, Any]:
    """The scoring stage of every door: with precondition.damping=auto choose delta first
    (recorded in the result set's summary as `damping_selection`), then score `query`."""
    auto = job.cfg.precondition.damping == "auto"
    with job.stage("damping") if auto else nullcontext():
        selection = select_damping([job], [query], job.cfg)
    out: dict[str, Any] = {"score": run_score(job, query)}
    if selection is not None:
        record_selection(job.index, job.cfg.run.name, selection)
        out["damping"] = selection
    return out


def shutdown(job: Job) -> None:
    release_workers(job)
    if job._reducer is not None:
        job._reducer.shutdown()
        job._reducer = None
