"""The driver: validate, plan shards, run the stages on Ray, report.

Every check that can fail (config, store, fingerprint) runs in `prepare`, before Ray
starts or any gradient is computed.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from grass_dist.build import (
    build_dataset,
    build_layer_compressors,
    build_model,
    build_task,
    fingerprint,
)
from grass_dist.config import JobConfig
from grass_dist.gradients import PhiBlock
from grass_dist.index import GradientIndex, Store
from grass_dist.models import state_hash
from grass_dist.runtime.cluster import connect, threads_for, worker_options
from grass_dist.runtime.reducer import Reducer
from grass_dist.runtime.scheduler import ActorPool, run_items
from grass_dist.runtime.worker import GradientWorker, ShardPlan, plan_shards

log = logging.getLogger("grass_dist")


@dataclass
class Job:
    """A validated job with its driver-side model and the index it writes to."""

    cfg: JobConfig
    raw: dict[str, Any]
    model_hash: str
    fingerprint: dict[str, Any]
    n_train: int
    timings: dict[str, float] = field(default_factory=dict)
    index: GradientIndex | None = None
    _pool: ActorPool | None = None
    _reducer: Any = None

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - t0
        log.info("stage %s took %.2f s", name, self.timings[name])


def prepare(cfg: DictConfig | dict, *, create_index: bool = True) -> Job:
    """Validate everything and open (or create) the index; no Ray, no gradients."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    job_cfg = JobConfig.from_cfg(raw)
    model = build_model(job_cfg)
    task = build_task(job_cfg)
    compressors = build_layer_compressors(job_cfg, model)
    train = build_dataset(job_cfg, "train")
    fp = fingerprint(job_cfg, model, compressors, task)
    Store(job_cfg.index_url, job_cfg.store.storage_options).check_writable()
    opts = job_cfg.store.storage_options
    index = (
        GradientIndex.create_or_open(job_cfg.index_url, fp, opts)
        if create_index
        else GradientIndex.open(job_cfg.index_url, opts)
    )
    if not create_index:
        GradientIndex.create_or_open(job_cfg.index_url, fp, opts)  # refuses a mismatch
    return Job(job_cfg, raw, state_hash(model), fp, len(train), index=index)


def _pool(job: Job) -> ActorPool:
    if job._pool is None:
        connect(job.cfg.cluster)
        cl = job.cfg.cluster
        actor_cls = ray.remote(GradientWorker).options(**worker_options(cl), max_restarts=0)
        threads = threads_for(cl.cpus_per_worker)
        job._pool = ActorPool(
            lambda i: actor_cls.remote(job.raw, job.model_hash, threads, i), cl.num_workers
        )
    return job._pool


def _reducer(job: Job):
    if job._reducer is None:
        connect(job.cfg.cluster)
        job._reducer = (
            ray.remote(Reducer)
            .options(num_cpus=0)
            .remote(
                job.cfg.index_url,
                job.cfg.store.storage_options,
                max(2, job.cfg.cluster.num_workers),
            )
        )
    return job._reducer


def run_index(job: Job, max_shards: int | None = None) -> dict[str, Any]:
    """Compute and commit every shard not yet committed (at most `max_shards` of them)."""
    committed = job.index.committed()
    plans = plan_shards(job.n_train, job.cfg.index.shard_size, committed)
    skipped = len(committed)
    if max_shards is not None:
        plans = plans[:max_shards]
    log.info("index: %d shards to compute, %d already committed (skipped)", len(plans), skipped)
    rows = sum(p.rows for p in plans)
    with job.stage("index"):
        if plans:
            bar = tqdm(total=len(plans), desc="index shards", unit="shard", dynamic_ncols=True)
            t0 = time.perf_counter()
            done_rows = 0

            def commit(batch: list[tuple[ShardPlan, Any]]) -> None:
                nonlocal done_rows
                job.index.commit([record for _, record in batch])
                done_rows += sum(p.rows for p, _ in batch)
                bar.set_postfix(rows_per_s=f"{done_rows / (time.perf_counter() - t0):.0f}")

            run_items(
                _pool(job),
                plans,
                lambda a, p: a.index_shard.remote(p),
                commit,
                describe=lambda p: f"shard {p.shard_id}",
                max_inflight=job.cfg.cluster.max_inflight_per_worker,
                max_retries=job.cfg.cluster.max_shard_retries,
                progress=bar.update,
            )
            bar.close()
    return {"computed_shards": len(plans), "skipped_shards": skipped, "rows": rows}


def run_precondition(job: Job) -> dict[str, Any]:
    with job.stage("precondition"):
        return ray.get(
            _reducer(job).build_preconditioner.remote(
                job.cfg.precondition.name, job.cfg.index.verify
            )
        )


def query_phi(job: Job, which: str = "query") -> PhiBlock:
    """phi of every row of data.<which>, from the worker pool with the index's compressors."""
    n = len(build_dataset(job.cfg, which))
    chunk = job.cfg.index.shard_size
    spans = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    blocks: dict[tuple[int, int], PhiBlock] = {}
    run_items(
        _pool(job),
        spans,
        lambda a, s: a.phi.remote(which, *s),
        lambda batch: blocks.update(batch),
        describe=lambda s: f"query rows {s[0]}..{s[1]}",
        max_inflight=job.cfg.cluster.max_inflight_per_worker,
        max_retries=job.cfg.cluster.max_shard_retries,
    )
    parts = [blocks[s] for s in spans]
    return PhiBlock(
        np.concatenate([p.row_ids for p in parts]),
        [k for p in parts for k in p.keys],
        {name: np.concatenate([p.phi[name] for p in parts]) for name in parts[0].phi},
    )


def run_score(job: Job) -> dict[str, Any]:
    sc = job.cfg.scoring
    with job.stage("query_gradients"):
        query = query_phi(job)
    with job.stage("score"):
        return ray.get(
            _reducer(job).score.remote(
                job.cfg.run.name,
                query,
                precondition_name=job.cfg.precondition.name,
                damping=job.cfg.precondition.damping,
                kind=sc.kind,
                topk=sc.topk,
                dense=sc.dense,
                self_influence=sc.self_influence,
                tile_rows=sc.tile_rows,
                verify=job.cfg.index.verify,
                breakdown=sc.breakdown,
                parallelism=sc.parallelism,
                cpus_per_task=sc.cpus_per_task,
                max_retries=job.cfg.cluster.max_shard_retries,
            )
        )


def shutdown(job: Job) -> None:
    if job._pool is not None:
        job._pool.shutdown()
        job._pool = None
    if job._reducer is not None:
        ray.kill(job._reducer)
        job._reducer = None
