"""The driver's stages on Ray: index, precondition, queries, score, repair.

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
from grass_dist.job import Job
from grass_dist.job import prepare as prepare  # re-exported: a door needs only this module
from grass_dist.job import prepare_started as prepare_started
from grass_dist.runtime import job_actors as actors
from grass_dist.runtime import local_shard, repair
from grass_dist.runtime.cluster import STOPPING, idle_cpus, map_tasks, this_machine_only
from grass_dist.runtime.driver_shard import DriverShard
from grass_dist.runtime.executors import Executor
from grass_dist.runtime.job_actors import on_workers as on_workers  # re-exported, as prepare
from grass_dist.runtime.job_actors import release_workers as release_workers
from grass_dist.runtime.local_shard import LocalShard, driver_phi
from grass_dist.runtime.pool import ActorPool
from grass_dist.runtime.reducer import ScoreRequest, read_preconditioner
from grass_dist.runtime.reducer_handle import KeptReducer
from grass_dist.runtime.scheduler import run_items
from grass_dist.runtime.worker import ShardPlan, ShardResult, plan_shards
from grass_dist.scoring import results

log = logging.getLogger("grass_dist")


def run_index(
    job: Job, max_shards: int | None = None, precondition_next: bool = False
) -> dict[str, Any]:
    """Compute and commit every shard not yet committed (at most `max_shards` of them, then
    without the driver's own: a partial index, as an interrupted job leaves).

    While the workers start, the driver may index shards of its own (`runtime.local_shard`):
    its commits count in the job's progress as they come, and the stage waits for no worker
    once it has committed every shard. With `precondition_next` (the job builds the
    preconditioner after the index) the reducer starts once the job's first shard is
    committed, the driver's or a worker's: its process starts (imports torch, opens the index)
    while the index builds, instead of after it, when the workers would wait for it. Where
    the workers leave CPUs idle its map tasks' processes start on them too; where they hold
    every CPU they are lent to the reducer's stages instead (`on_workers`).
    """
    local, job._local = job._local, None
    if local is not None and max_shards is not None:
        local.stop()  # what it committed counts as this job's; it takes no more
    plans, skipped = _to_compute(job, local, max_shards)
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
        return {"computed_shards": 0, "skipped_shards": skipped, "rows": 0, "driver_shards": 0}
    if local is None or not local_shard.alone(job.cfg):  # else Ray starts if it needs one
        actors.connect_job(job)  # a commit of the driver's is counted on its node
    job.progress.index_plan(len(plans) + skipped, skipped, job.n_train, rows)
    stage = _IndexStage(job, DriverShard(job, local), reducer_early=precondition_next)
    stage.run(plans)
    if stage.pool is not None and stage.pool.ready:
        job._replica = None  # the workers compute the queries (query_phi): free the model
    out = {
        "computed_shards": len(plans),
        "skipped_shards": skipped,
        "rows": rows,
        "driver_shards": len(stage.driver.counted),
    }
    dropped = stage.dropped + (local.dropped if local is not None else [])
    if dropped:
        log.warning(
            "%d of the %d shards this job computed were committed meanwhile by another "
            "writer of %s (another job on the same store.url?), so this job's attempts were "
            "dropped (the index holds each shard once; `jobs.gc` removes their files)",
            len(dropped),
            len(plans),
            job.index.store.url_of(""),
        )
        out["dropped_shards"] = len(dropped)
    return out


def _to_compute(
    job: Job, local: LocalShard | None, max_shards: int | None
) -> tuple[list[ShardPlan], int]:
    """The shards this job computes (the first `max_shards`), and how many it skips as
    committed before it: the driver's own, committed or not, are among the first."""
    committed = job.index.committed()
    if local is not None:
        for plan in local.taken():  # after `committed()`: a shard taken since is not in it
            committed.pop(plan.shard_id, None)
    plans = plan_shards(job.n_train, job.cfg.index.shard_size, committed)
    return (plans if max_shards is None else plans[:max_shards]), len(committed)


class _IndexStage:
    """The index stage of `run_index`: the workers start while the driver indexes shards of
    its own (`driver`); then the workers index the rest (beside the driver, where it is one
    of the job's computing processes: `local_shard.member`), each commit counted as it
    lands, and the reducer starts once the first shard is in (with `reducer_early`)."""

    def __init__(self, job: Job, driver: DriverShard, reducer_early: bool):
        self.job, self.driver, self.reducer_early = job, driver, reducer_early
        self.dropped: list[str] = []  # shards another writer committed first (another job?)
        self.pool: ActorPool | None = None

    def run(self, plans: list[ShardPlan]) -> None:
        """Index `plans`: the driver's own shards, then the workers' (and any the driver
        took but gave back late). A driver that indexes alone (`local_shard.alone`)
        starts a worker only for the shards it gave back."""
        if self.driver.local is not None and local_shard.alone(self.job.cfg):
            with self.job.stage("index"):
                while not self.driver.local.wait(0.2):
                    self.tick()  # its commits count as they land
                self.tick()
                done = self.driver.local.committed()
                back = [p for p in plans if p.shard_id not in done]
                if back and STOPPING.is_set():  # Ctrl-C, SIGTERM: Ray is stopping
                    raise RuntimeError("not starting a worker: this process is stopping")
                if back:  # it failed otherwise than by its rows, or the job ends early
                    self.pool = actors.ready_pool(self.job)
                    self.index(back)
            return

        def waiting() -> bool:
            """While no worker is ready: the driver's commits count as they come; True once
            it has committed every shard (the stage then needs no worker)."""
            self.tick()
            return self.driver.computed(plans)

        with self.job.stage("start_workers"):
            self.pool = actors.ready_pool(self.job, unless=waiting)
        with self.job.stage("index"):
            self.driver.close()
            self.start_reducer()  # now if the driver already committed a shard
            self.index(self.driver.others(plans))
            self.driver.wait(self.tick)  # a member driver's last shard
            self.index(self.driver.returned())

    def start_reducer(self) -> None:
        if self.reducer_early and self.job.first_shard_s is not None:  # it delays no shard
            self.reducer_early = False
            actors.job_reducer(self.job).start("started early, to be ready when the index is")

    def tick(self) -> None:
        self.driver.account()
        self.start_reducer()
        self.job.progress.tick()

    def index(self, todo: list[ShardPlan]) -> None:
        run_items(
            self.pool,
            todo,
            lambda a, p: a.index_shard.remote(p),
            self.commit,
            describe=lambda p: f"shard {p.shard_id}",
            max_inflight=self.job.cfg.cluster.max_inflight_per_worker,
            max_retries=self.job.cfg.cluster.max_shard_retries,
            on_tick=self.tick,
        )

    def commit(self, batch: list[tuple[ShardPlan, ShardResult]]) -> None:
        job = self.job
        records = [res.record for _, res in batch]
        with job.progress.held():  # a commit and its count land as one (see LocalShard)
            if STOPPING.is_set():
                return  # the process stops and its record is ended: the shards go uncommitted
            version = job.index.commit(records)
            dropped = job.index.not_kept(records)
            self.dropped.extend(dropped)
            if job.first_shard_s is None and len(dropped) < len(records):
                job.first_shard_committed()  # a shard of this job's is in the index
            nodes = [res.node_id for _, res in batch]
            job.progress.shards_done(sum(p.rows for p, _ in batch), nodes)
        self.start_reducer()
        done = ", ".join(f"{p.shard_id} (worker {r.worker_id})" for p, r in batch)
        log.debug("committed %s in manifest version %d", done, version)
        self.driver.account()


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
