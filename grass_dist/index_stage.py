"""The index stage (`run_index`): every shard not yet committed, computed by the driver's
own shards (`runtime.local_shard`) and the worker pool, each commit counted as it lands,
and the reducer started once the first shard is in when the preconditioner comes next.
`grass_dist.pipeline` re-exports it beside the other stages."""

from __future__ import annotations

import logging
from typing import Any

from grass_dist.job import Job
from grass_dist.runtime import job_actors as actors
from grass_dist.runtime import local_shard
from grass_dist.runtime.cluster import STOPPING
from grass_dist.runtime.driver_shard import DriverShard
from grass_dist.runtime.local_shard import LocalShard
from grass_dist.runtime.pool import ActorPool
from grass_dist.runtime.scheduler import run_items
from grass_dist.runtime.worker import ShardPlan, ShardResult, plan_shards

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
