"""The driver's own shard: the first shard of an index, computed in the driver's process
while an embedded Ray and the workers start.

A `jobs/` door's driver builds the model, task, data and compressors to check the job
(`pipeline.prepare`) and then waits seconds for Ray's processes and the workers' (each
imports torch and builds its replica). `LocalShard` spends that wait on the first
uncommitted shard: on the CPU, with a worker's thread count and the worker's code
(`worker.index_rows`), so the index holds the same bits whichever process computed it. The
driver commits it as soon as it is written (a commit keeps a shard's first committed
attempt), and the workers take the other shards meanwhile. A shard whose first batch
projects more than `BUDGET_S` of work goes back to the workers at once, rather than compete
with their start-up; so does one that fails (a worker then fails it as it would have).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import ray
import torch

from grass_dist.assembly import Replica
from grass_dist.config import JobConfig
from grass_dist.gradients.computer import GradientComputer
from grass_dist.index import GradientIndex, ShardRecord
from grass_dist.runtime.cluster import threads_for
from grass_dist.runtime.overlap import Phases
from grass_dist.runtime.worker import ShardPlan, index_rows

if TYPE_CHECKING:
    from grass_dist.job import Job

log = logging.getLogger(__name__)

# Seconds of work a driver's shard may take, projected from its first batch: about what
# Ray's and the workers' start takes on a small machine, so that the driver competes with
# working workers for a few seconds at most.
BUDGET_S = 4.0


class _Stopped(Exception):
    """Raised between batches to leave the shard to the workers: why."""


def wanted(cfg: JobConfig) -> bool:
    """Whether the driver indexes a shard while the workers start: `cluster.driver_shard`,
    an embedded Ray (the driver's machine is the cluster) whose workers compute on the CPU
    (without CUDA here), and no injected faults (they are aimed at workers)."""
    return (
        cfg.cluster.driver_shard
        and cfg.cluster.address is None
        and not torch.cuda.is_available()
        and cfg.faults.kill_worker_after_rows is None
        and cfg.faults.shard_delay_s == 0
    )


class LocalShard:
    """`plan`'s rows of `dataset` through the driver's `replica` into `index`, on a daemon
    thread started now."""

    def __init__(
        self,
        cfg: JobConfig,
        replica: Replica,
        dataset: Any,
        index: GradientIndex,
        plan: ShardPlan,
    ):
        self.plan = plan
        self.record: ShardRecord | None = None  # set once committed
        self.committed_at: float | None = None  # time.time() of the commit
        self._cfg, self._index = cfg, index
        self._replica: Replica | None = replica
        self._dataset = dataset
        self._stop = threading.Event()
        self._t0, self._rows = 0.0, 0  # when the shard started, rows computed since
        self._thread = threading.Thread(target=self._run, name="driver-shard", daemon=True)
        self._thread.start()

    def given_back(self) -> bool:
        """Whether it ended without committing: the workers compute the shard."""
        return not self._thread.is_alive() and self.record is None

    def result(self) -> ShardRecord | None:
        """Wait for it; its committed record, else None (the workers compute the shard)."""
        self._thread.join()
        return self.record

    def stop(self) -> ShardRecord | None:
        """`result`, abandoning the shard at its next batch (a job that ends early)."""
        self._stop.set()
        return self.result()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            record = self._compute()
            self._index.commit([record])  # written whole: worth keeping, stopped or not
            self.record, self.committed_at = record, time.time()
        except _Stopped as e:
            log.info("shard %s goes to the workers: %s", self.plan.shard_id, e)
            return
        except Exception as e:  # noqa: BLE001 -- a worker computes it again (and fails as it should)
            sid = self.plan.shard_id
            log.info("the driver's shard %s failed (%s): the workers compute it", sid, e)
            return
        finally:
            self._replica = self._dataset = None  # not needed again
        sid, seconds = self.plan.shard_id, time.perf_counter() - t0
        log.info("the driver indexed shard %s in %.2f s", sid, seconds)

    def _compute(self) -> ShardRecord:
        r = self._replica
        self._t0 = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(threads_for(self._cfg.cluster.cpus_per_worker))  # a worker's
        try:
            computer = GradientComputer(r.model, r.task, r.compressors, "cpu")
            return index_rows(
                computer,
                self._dataset,
                self._index,
                self.plan,
                self._cfg.index.batch_size,
                Phases(),
                on_batch=self._check,
            )
        finally:
            torch.set_num_threads(threads)

    def _check(self, rows: int) -> None:
        if self._stop.is_set():
            raise _Stopped("the job ends")
        self._rows += rows
        if self._rows == rows:  # the first batch: project the whole shard from it
            projected = (time.perf_counter() - self._t0) * self.plan.rows / rows
            if projected > BUDGET_S:
                raise _Stopped(f"about {projected:.1f} s of work, more than {BUDGET_S} s")


class DriverShard:
    """The index stage's view of the driver's own shard (`LocalShard`, or None): which
    plans the workers take, and its commit counted in the job's first shard and progress
    (on the stage's thread, which owns them)."""

    def __init__(self, job: Job, local: LocalShard | None):
        self.job, self.local, self.done = job, local, False
        self.working = False  # the driver still works on its shard as the workers start
        self.account()

    def others(self, plans: list[ShardPlan]) -> list[ShardPlan]:
        """The workers' shards: all but the driver's, unless it already gave it back."""
        self.working = self.local is not None and not self.local.given_back()
        if not self.working:
            return plans
        return [p for p in plans if p.shard_id != self.local.plan.shard_id]

    def returned(self) -> list[ShardPlan]:
        """After the workers' shards: the driver's shard if it gave it back since `others`
        (it waits for the driver)."""
        if not self.working:
            return []  # none, or among the workers' shards
        if self.local.result() is None:
            return [self.local.plan]
        self.account()
        return []

    def account(self) -> None:
        """Count the driver's commit once it happened (first shard, progress)."""
        local = self.local
        if self.done or local is None or local.record is None:
            return
        self.done = True
        first = local.committed_at - self.job.started
        if self.job.first_shard_s is None or first < self.job.first_shard_s:
            self.job.first_shard_committed(first)
        node = ray.get_runtime_context().get_node_id()
        self.job.progress.shards_done(local.plan.rows, [node])
