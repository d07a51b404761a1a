"""The index stage's view of the driver's own shards (`local_shard.LocalShard`): its
commits counted in the job's first shard and progress as each lands, and which shards the
workers take beside or after it."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING

import ray

from grass_dist.runtime.local_shard import REFUSALS, LocalShard
from grass_dist.runtime.scheduler import SharedItems
from grass_dist.runtime.worker import ShardPlan

if TYPE_CHECKING:
    from grass_dist.job import Job


class DriverShard:
    """The index stage's view of the driver's own shards (`LocalShard`, or None): the
    driver's commits counted in the job's first shard and progress as each lands (on the
    driver's thread: a record ended by Ctrl-C meanwhile counts every commit before it) and,
    once it is closed, which plans the workers take."""

    def __init__(self, job: Job, local: LocalShard | None):
        self.job, self.local = job, local
        self.mine: list[ShardPlan] = []  # the driver's, once closed
        self.awaited: list[ShardPlan] = []  # the driver's, not yet committed, at `others`
        self.counted: set[str] = set()  # the driver's commits counted so far
        if local is not None:
            local.on_commit = self.count
        self.account()

    def close(self) -> None:
        """The driver takes no more shards (a worker is ready, or it computed them all);
        a `member` driver goes on taking them, from the workers' queue (`others`)."""
        if self.local is not None and not self.local.member:
            self.mine = self.local.close()

    def computed(self, plans: list[ShardPlan]) -> bool:
        """Whether the driver computed and committed every one of `plans`."""
        return self.local is not None and self.local.computed(plans)

    def others(self, plans: list[ShardPlan]) -> list[ShardPlan] | SharedItems[ShardPlan]:
        """The workers' shards: all but the driver's, save those it already gave back; for a
        `member` driver, those it has not taken, from the queue it takes its own from."""
        if self.local is None:
            return plans
        if self.local.member:
            return self._shared(plans)
        running = self.local.running()  # before `committed`: a commit after it is seen
        done = self.local.committed()
        self.awaited = [p for p in self.mine if p.shard_id not in done] if running else []
        skipped = done.keys() | {p.shard_id for p in self.awaited}
        return [p for p in plans if p.shard_id not in skipped]

    def _shared(self, plans: list[ShardPlan]) -> SharedItems[ShardPlan]:
        """`plans` as the workers take them from the member driver's queue (`hand_out`):
        the ones nobody took yet, then any of `plans` that its queue lacks."""
        local, wanted = self.local, {p.shard_id for p in plans}
        queued = {p.shard_id for p in local.queued()}
        extra = deque(p for p in plans if p.shard_id not in queued)

        def take() -> ShardPlan | None:
            while (plan := local.hand_out()) is not None:
                if plan.shard_id in wanted:  # else committed meanwhile by another writer
                    return plan
            return extra.popleft() if extra else None

        return SharedItems(take, lambda: local.left() + len(extra))

    def wait(self, tick: Callable[[], None]) -> None:
        """Wait for a `member` driver's last shard, calling `tick` meanwhile (its commits
        count as they land)."""
        if self.local is not None and self.local.member:
            while not self.local.wait(0.2):
                tick()

    def returned(self) -> list[ShardPlan]:
        """After the workers' shards: those of the driver's it gave back since `others`
        (this waits for the driver). Every commit of the driver's is counted by then, also
        those made after the last count of the wait for workers, which they ended."""
        if self.local is not None and self.local.member:
            done = self.local.result()
            self.account()
            return [p for p in self.local.taken() if p.shard_id not in done]
        done = self.local.result() if self.awaited else {}
        self.account()
        return [p for p in self.awaited if p.shard_id not in done]

    def account(self) -> None:
        """Count the driver's commits not counted yet; then raise the rows' refusal of a
        shard of the driver's (`LocalShard.refusal`): the job's error."""
        if self.local is None:
            return
        refusal = self.local.refusal  # read first: the commits made before it are counted
        self.count()
        if refusal is not None:
            raise refusal

    def count(self) -> None:
        """Count the driver's commits once each (first shard, progress), on the driver's
        thread or the stage's; by the node it computes on (`driver` before Ray is up)."""
        with self.job.progress.held():
            new = {s: c for s, c in self.local.committed().items() if s not in self.counted}
            if not new:
                return
            self.counted.update(new)
            kept = [at for s, (_, at) in new.items() if s not in self.local.dropped]
            first = min(kept, default=None)  # not a shard another writer committed first
            if first is not None and (
                self.job.first_shard_s is None or first - self.job.started < self.job.first_shard_s
            ):
                self.job.first_shard_committed(first - self.job.started)
            rows = sum(record.rows for record, _ in new.values())
            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "driver"
            self.job.progress.shards_done(rows, [node] * len(new))


def count_as_the_record_ends(
    job: Job, local: LocalShard, shards_total: int, skipped: int, rows_todo: int
) -> None:
    """Count the commits of `local` that no count has seen as the job's progress record
    ends (`JobProgress.before_finish`): those of a job that ends before its index stage
    planned its count (Ctrl-C or a failure while Ray starts), planned here as the stage
    would have, or made as the stage began, before it counted the driver's."""
    if not local.committed():
        return
    if job.progress.doc["index"] is None:
        since = time.time() - job.started - job.startup_s.get("prepared", 0.0)  # began then
        job.progress.index_plan(
            shards_total, skipped, job.n_train, rows_todo, bar=False, since_s=since
        )
    with suppress(*REFUSALS):  # the job's error, which it fails with where it is raised
        if local.on_commit is not None:
            local.on_commit()  # the stage's count, of what it has not counted yet
        else:
            DriverShard(job, local)  # counts the commits so far
