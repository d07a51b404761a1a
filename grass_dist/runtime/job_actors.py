"""A job's actors on Ray: its Ray connection, its worker pool and its reducer, and the
lending of its workers to the reducer's stages (`on_workers`).

Each is started on first use and kept on the job (`Job._pool`, `Job._reducer`) until
`release_workers` or the job's shutdown (grass_dist.pipeline).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from grass_dist import assembly
from grass_dist.job import Job, stop_early
from grass_dist.runtime.cluster import connect, idle_cpus, on_request_active
from grass_dist.runtime.executors import WorkersLostError
from grass_dist.runtime.local_shard import ray_workers
from grass_dist.runtime.placement import start_worker_pool
from grass_dist.runtime.pool import ActorPool
from grass_dist.runtime.reducer_handle import ReducerHandle

log = logging.getLogger("grass_dist")
T = TypeVar("T")


def connect_job(job: Job) -> None:
    """Start or join the job's Ray (`cluster.connect`); the job's `ray` start-up milestone."""
    connect(job.cfg.cluster)
    job.reached("ray")


def started_pool(job: Job) -> ActorPool:
    """The worker pool, started on first use (from the job's early actors when it has
    them); its workers may still be starting."""
    if job._pool is None:
        connect_job(job)
        objects = assembly.ship(job.raw)  # in-memory model/task/data, once per pool
        spares, job._spares = job._spares, []
        job._pool = start_worker_pool(
            job.cfg.cluster, job.raw, job.model_hash, objects, spares, _size(job)
        )
    return job._pool


def _size(job: Job) -> int:
    """Workers the pool starts: `cluster.num_workers`, less the driver where it computes
    shards as one of them (`local_shard.ray_workers`)."""
    return ray_workers(job.cfg) if job._member else job.cfg.cluster.num_workers


def ready_pool(job: Job, unless: Callable[[], bool] | None = None) -> ActorPool:
    """The worker pool (`started_pool`); with none ready, waits until one is (the others
    join as they are placed), and then the driver takes no more shards of its own; or until
    `unless()` says the caller needs no worker after all (the driver computed them all)."""
    pool = started_pool(job)
    local = job._local  # a member driver takes shards beside the workers: not closed
    if not pool.ready and pool.wait_ready(1, unless) and local is not None and not local.member:
        local.close()
    if pool.ready:
        job.reached("first_worker")
    return pool


def release_workers(job: Job) -> None:
    """Stop the worker pool (and unused early actors) so their CPUs/GPUs go to Ray tasks."""
    stop_early(job._spares, ours=False)
    job._spares = []
    if job._pool is not None:
        job._pool.shutdown()
        job._pool = None


def job_reducer(job: Job) -> ReducerHandle:
    """The job's reducer (in the driver or an actor: `Job.reduces_in_driver`), started on
    first use."""
    if job._reducer is None:
        in_driver = job.reduces_in_driver()
        if not (in_driver and on_request_active()):  # else Ray starts if a call needs one
            connect_job(job)
        job._reducer = ReducerHandle(job.cfg, in_driver)
    return job._reducer


# How long a reducer stage waits for workers already starting before it stops them and runs
# on Ray tasks instead (a task's process would start in place of one: a few seconds).
LEND_WAIT_S = 60.0


def lendable_workers(job: Job, tasks_only: bool = False) -> list[Any]:
    """The job's workers to lend to a reducer stage: the ready ones, when the pool's
    workers (ready or still starting) claim every CPU of the cluster, so that its Ray tasks
    would only wait for them to stop and then start new processes in their place; unless
    the stage needs tasks (`tasks_only`). With none ready yet (the driver computed the
    shards and queries while they started), the stage waits for the first (at most
    `LEND_WAIT_S`), as a task's new process would start no sooner. Otherwise none, and the
    workers stop first so that the stage's tasks get their CPUs."""
    if not tasks_only and (job._pool is not None or job._spares):
        pool = started_pool(job)
        pool.admit()  # a worker may have become ready after the last shard was handed out
        claimed = len(pool.actors) + len(pool.starting)
        if idle_cpus(job.cfg.cluster, claimed) < 1 and _one_ready(job, pool):
            return pool.actors
    release_workers(job)
    return []


def _one_ready(job: Job, pool: ActorPool) -> bool:
    """Whether a worker of `pool` is ready, waiting up to `LEND_WAIT_S` for one to start."""
    if not pool.ready and pool.starting:
        deadline = time.monotonic() + LEND_WAIT_S
        if not pool.wait_ready(1, unless=lambda: time.monotonic() > deadline):
            log.info("no worker ready after %.0f s: the stage runs on Ray tasks", LEND_WAIT_S)
    if pool.ready:
        job.reached("first_worker")
    return bool(pool.ready)


def on_workers(job: Job, stage: Callable[[list[Any]], T], tasks_only: bool = False) -> T:
    """stage(workers): a reducer stage on the job's lent workers (`lendable_workers`); if
    one of them dies, the workers stop and the stage runs again on Ray tasks (it starts
    over from the store: the committed shards, the saved preconditioner)."""
    workers = [] if job_reducer(job).in_driver else lendable_workers(job, tasks_only)
    return with_lent(job, stage, workers)


def with_lent(job: Job, stage: Callable[[list[Any]], T], workers: list[Any]) -> T:
    """stage(workers); if one of the lent `workers` dies, the workers stop and the stage
    runs again on Ray tasks (stage([]))."""
    if workers:
        said = (
            "the idle worker runs" if len(workers) == 1 else f"the {len(workers)} idle workers run"
        )
        log.info("%s the stage's map calls", said)
    try:
        return stage(workers)
    except WorkersLostError as e:
        if not workers:
            raise
        log.warning("%s", e)
        release_workers(job)
        return stage([])
