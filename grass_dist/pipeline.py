"""The driver's stages on Ray: index (grass_dist.index_stage), precondition, queries, score,
repair.

A door takes a job from `prepare` or `prepare_started` (grass_dist.job, re-exported here so
that a door needs only this module), runs stages on it and ends with `shutdown`. The job's
Ray, worker pool and reducer are started on first use by grass_dist.runtime.job_actors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np

from grass_dist.build import build_dataset
from grass_dist.config import JobConfig
from grass_dist.fidelity import damping
from grass_dist.gradients.computer import PhiBlock
from grass_dist.index_stage import run_index as run_index  # re-exported, as prepare
from grass_dist.job import Job
from grass_dist.job import prepare as prepare  # re-exported: a door needs only this module
from grass_dist.job import prepare_started as prepare_started
from grass_dist.runtime import job_actors as actors
from grass_dist.runtime import local_shard, repair
from grass_dist.runtime.cluster import idle_cpus, map_tasks, this_machine_only
from grass_dist.runtime.executors import Executor
from grass_dist.runtime.job_actors import on_workers as on_workers  # re-exported, as prepare
from grass_dist.runtime.job_actors import release_workers as release_workers
from grass_dist.runtime.local_shard import driver_phi
from grass_dist.runtime.reducer import ScoreRequest, read_preconditioner
from grass_dist.runtime.reducer_handle import KeptReducer
from grass_dist.runtime.scheduler import run_items
from grass_dist.scoring import results

log = logging.getLogger("grass_dist")


def index_stages(job: Job, precondition_next: bool = False) -> dict[str, Any]:
    """The index stage (`run_index`), after the repair stage when `index.repair=true`:
    `jobs.index`, `jobs.attribute` and the API's `Index.build` alike."""
    out = {"repair": run_repair(job)} if job.cfg.index.repair else {}
    out["index"] = run_index(job, precondition_next=precondition_next)
    return out


def run_repair(job: Job) -> dict[str, Any]:
    """Check every committed shard; recompute and re-commit only the bad ones."""
    with job.stage("repair"):
        actors.connect_job(job)
        workers: list[Any] = []
        if job._spares and idle_cpus(job.cfg.cluster, len(job._spares)) < 1:
            # Ray tasks would wait for good for the CPUs that the early workers hold, and
            # stopping workers that are still starting can leave their CPUs held in Ray: the
            # scan runs on the workers instead, once one is ready (they index next).
            workers = actors.lendable_workers(job)
        committed, bad = actors.with_lent(
            job,
            lambda lent: repair.scan(job.index, map_tasks(job.cfg.cluster), Executor(lent)),
            workers,
        )
        log.info("repair: %d committed shards checked, %d bad", len(committed), len(bad))
        fixed = (
            repair.recompute(
                job.index, actors.ready_pool(job), [committed[s] for s in bad], job.cfg.cluster
            )
            if bad
            else {}
        )
    return {"checked_shards": len(committed), "bad_shards": bad, "recomputed": fixed}


def run_precondition(job: Job) -> dict[str, Any]:
    with job.stage("precondition"):
        p, verify = job.cfg.precondition, job.cfg.index.verify
        return on_workers(
            job, lambda lent: actors.job_reducer(job).precondition(p.name, verify, p.damping, lent)
        )


def query_phi(job: Job, which: str = "query") -> PhiBlock:
    """phi of every row of data.<which>, from the worker pool with the index's compressors,
    in chunks of `index.shard_size` rows; or, while no worker is ready, from the driver's
    replica (`local_shard.driver_phi`: the same bits, chunk by chunk): a query set of one
    chunk, or any, for a driver that computes alone (`local_shard.alone`: its one worker
    would compute them on the same CPUs)."""
    replica, job._replica = job._replica, None  # needed here only
    dataset = build_dataset(job.cfg, which)
    n = len(dataset)
    chunk = job.cfg.index.shard_size
    spans = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    by_driver = replica is not None and (len(spans) == 1 or local_shard.alone(job.cfg))
    blocks: dict[tuple[int, int], PhiBlock] = {}
    with job.stage(f"{which}_gradients"):
        if by_driver and _no_worker_ready(job):
            log.info("%s gradients: %d rows, computed by the driver", which, n)
            for s in spans:
                blocks[s] = driver_phi(job.cfg, replica, dataset, *s, which)
        else:
            run_items(
                actors.ready_pool(job),
                spans,
                lambda a, s: a.phi.remote(which, *s),
                blocks.update,
                describe=lambda s: f"{which} rows {s[0]}..{s[1]}",
                max_inflight=job.cfg.cluster.max_inflight_per_worker,
                max_retries=job.cfg.cluster.max_shard_retries,
            )
    if len(spans) == 1:
        return blocks[spans[0]]
    parts = [blocks[s] for s in spans]
    return PhiBlock(
        np.concatenate([p.row_ids for p in parts]),
        [k for p in parts for k in p.keys],
        {name: np.concatenate([p.phi[name] for p in parts]) for name in parts[0].phi},
    )


def _no_worker_ready(job: Job) -> bool:
    """No worker ready yet (none started, or all still starting), and the cluster is this
    machine alone: the driver's CPU computes as the workers' would (`local_shard.wanted`
    held at prepare)."""
    if job._pool is not None:
        job._pool.admit()
        if job._pool.ready:
            return False
    return this_machine_only()


def run_score(job: Job, query: PhiBlock | None = None) -> dict[str, Any]:
    """Score `query` (default: data.query) against the whole index; write results."""
    if query is None:
        query = query_phi(job)
    req = ScoreRequest.of(job.cfg)
    overlap = topk_overlap(req.topk, job.n_train)
    if overlap is not None:
        log.warning(overlap)
    with job.stage("score"):
        return on_workers(
            job,
            lambda lent: actors.job_reducer(job).score(query, req, lent),
            tasks_only=req.fresh_process(len(query.row_ids)),
        )


def topk_overlap(topk: int, n_train: int) -> str | None:
    """What a user is told when each query's `topk` proponents and `topk` opponents must
    share rows of the `n_train`; None when they need not."""
    if 2 * topk <= n_train:
        return None
    both = 2 * min(topk, n_train) - n_train
    whole = f"; each list holds all {n_train} rows" if topk > n_train else ""
    apart = (
        f"set scoring.topk to {n_train // 2} or less to keep them apart"
        if n_train >= 2
        else "with one training row, both lists are that row"
    )
    return (
        f"scoring.topk={topk} of {n_train} training rows: each query's proponents and "
        f"opponents share {both} rows (a row ranked both among its most and its least "
        f"helpful){whole}; {apart}"
    )


def members_of(jobs: list[Job], queries: list[PhiBlock]) -> list[damping.Member]:
    return [
        damping.Member(
            j.index,
            read_preconditioner(j.index, j.cfg.precondition.name),
            q,
            j.cfg,
            Executor(inline=j.reduces_in_driver()),
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
    if auto:
        release_workers(job)  # the sweep's tasks need the workers' CPUs
    with job.stage("damping") if auto else nullcontext():
        selection = select_damping([job], [query], job.cfg)
    out: dict[str, Any] = {"score": run_score(job, query)}
    if selection is not None:
        record_selection(job.index, job.cfg.run.name, selection)
        out["damping"] = selection
    return out


@contextmanager
def running(job: Job, kept: KeptReducer | None = None) -> Iterator[Job]:
    """The job's stages run inside: its progress record ends done or failed, and its
    workers, reducer and driver's shards stop, however it ends; the reducer stays up
    for the caller's next job where `kept` holds it (it lends the job the one it kept)."""
    if kept is not None:
        kept.lend(job)
    try:
        yield job
    except BaseException as e:
        if job.progress is not None:
            job.progress.finish(e)
        raise
    else:
        if job.progress is not None:
            job.progress.finish()
    finally:
        if kept is not None:
            kept.take_back(job)
        shutdown(job)


def shutdown(job: Job) -> None:
    job._replica = None
    if job._local is not None:  # a job that ended before its index stage
        job._local.stop()
        job._local = None
    release_workers(job)
    if job._reducer is not None:
        job._reducer.shutdown()
        job._reducer = None
