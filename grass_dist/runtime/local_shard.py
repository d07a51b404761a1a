"""The driver's own shards: the first shards of an index, computed in the driver's process
while an embedded Ray and the workers start.

A `jobs/` door's driver builds the model, task, data and compressors to check the job
(`pipeline.prepare`) and then waits seconds for Ray's processes and the workers' (each
imports torch and builds its replica). `LocalShard` spends that wait on the uncommitted
shards, front of the plan first: on the CPU, with a worker's thread count and the worker's
code (`worker.index_rows`), so the index holds the same bits whichever process computed
them. It commits each as soon as it is written (a commit keeps a shard's first committed
attempt) and takes the next one as long as no worker is ready: the index stage `close`s it
when the first worker is, and the workers take the shards it has not taken.

The driver's shards compete with the workers' start for the CPUs, so it keeps one only
where that pays. A shard that spares the workers a round of shards (with one worker, every
shard; with two workers and three shards left, the first) is finished however long it
takes: the job ends a round sooner. Any other shard goes back to the workers when its first
batch projects more than `BUDGET_S` of work: with two workers and two shards, the driver's
shard would only delay the worker that computes the other. A shard that the rows
themselves make fail (a NaN loss or gradient, rows the task cannot batch, items it does not
take: `REFUSALS`) fails the job as a worker's would, without waiting for one to compute it
again: it runs the same code on the same bits. A shard that fails otherwise goes back to the
workers (the driver's process is not a worker's), and so does one stopped because the job
ends.

A few queries, too (`driver_phi`): where a job scores a query set of one chunk while no
worker is ready (the Python API's `Index.attribute` starts none; a job's are still starting),
the driver computes its phi the same way, rather than wait seconds for a worker to start
for milliseconds of work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import TYPE_CHECKING, Any

import ray
import torch

from grass_dist.assembly import Replica
from grass_dist.config import JobConfig
from grass_dist.errors import BadRowsError, ConfigError, NonFiniteGradientError
from grass_dist.gradients.computer import GradientComputer, PhiBlock
from grass_dist.index import GradientIndex, ShardRecord
from grass_dist.runtime import compute_thread
from grass_dist.runtime.cluster import (
    STOPPING,
    driver_alone,
    driver_computes,
    lanes_for,
    threads_for,
)
from grass_dist.runtime.overlap import Phases
from grass_dist.runtime.worker import ShardPlan, index_rows, phi_rows

if TYPE_CHECKING:
    from grass_dist.job import Job

log = logging.getLogger(__name__)

# Seconds of work the driver may spend on a shard that spares the workers no round of
# shards, projected from its first batch: about what Ray's and the workers' start takes on a
# small machine, so that such a shard competes with their start for a few seconds at most.
BUDGET_S = 4.0

# What the rows of a shard raise through a worker's code, on any process alike: the driver's
# shard that raises one of these fails the job (`LocalShard.refusal`).
REFUSALS = (NonFiniteGradientError, BadRowsError, ConfigError)


@contextmanager
def as_a_worker(cfg: JobConfig, replica: Replica) -> Iterator[GradientComputer]:
    """The driver's `replica` computing as a CPU worker does: on a worker's thread count
    (torch's kernels split their sums by threads), the driver's own restored after. (In
    the Python API the replica's model is the job's copy of the caller's.)"""
    threads = compute_thread.call(torch.get_num_threads)
    worker_threads = threads_for(cfg.cluster.cpus_per_worker)
    compute_thread.call(torch.set_num_threads, worker_threads)
    try:
        lanes = lanes_for(cfg.cluster, worker_threads)
        yield GradientComputer(replica.model, replica.task, replica.compressors, "cpu", lanes)
    finally:
        compute_thread.call(torch.set_num_threads, threads)


def driver_phi(
    cfg: JobConfig, replica: Replica, dataset: Any, start: int, end: int, which: str = "query"
) -> PhiBlock:
    """phi of rows [start, end) of `dataset` (data.<which>), computed by the driver as a
    worker would (`as_a_worker`, `worker.phi_rows`): the same bits, without starting the
    workers."""
    with as_a_worker(cfg, replica) as computer:
        return phi_rows(computer, dataset, start, end, cfg.index.batch_size, which=which)


class _Stopped(Exception):
    """Raised between batches to leave the shard to the workers: why."""


def wanted(cfg: JobConfig) -> bool:
    """Whether the driver indexes shards while the workers start: `cluster.driver_shard`,
    an embedded Ray (the driver's machine is the cluster) whose workers compute on the CPU
    (without CUDA here), and no injected faults (they are aimed at workers):
    `cluster.driver_computes`."""
    return driver_computes(cfg) and not torch.cuda.is_available()


def alone(cfg: JobConfig) -> bool:
    """Whether the driver indexes every shard itself, with no worker started unless it
    gives a shard back: `wanted`, and one worker that would not grow (`cluster.num_workers`
    1, `max_workers` at most 1: `cluster.driver_alone`). That worker would run on the
    driver's machine with the thread count the driver computes with, and take over the
    shards only once it had started: its start would only take the CPUs from the driver's
    shards meanwhile. So would Ray's: a `jobs/` job starts it only for a shard given back,
    a reducer too large for the driver or damping=auto (`cluster.OnRequest`); the driver
    differentiates every query itself too (`pipeline.query_phi`)."""
    return driver_alone(cfg) and not torch.cuda.is_available()


class LocalShard:
    """`plans`' rows of `dataset`, front first, through the driver's `replica` into `index`,
    on a daemon thread started now, until `close` or `stop`, or the process stops
    (`cluster.STOPPING`). Each commit and its `on_commit` run holding `landing` (the job's
    progress record's lock: a record that Ctrl-C ends waits for a commit in hand, and no
    commit starts after it)."""

    def __init__(
        self,
        cfg: JobConfig,
        replica: Replica,
        dataset: Any,
        index: GradientIndex,
        plans: list[ShardPlan],
        landing: AbstractContextManager[Any] | None = None,
    ):
        self._cfg, self._index = cfg, index
        self._landing = landing if landing is not None else nullcontext()
        self._replica: Replica | None = replica
        self._dataset = dataset
        self._plans = list(plans)
        self._taken: list[ShardPlan] = []  # started, in plan order
        self._committed: dict[str, tuple[ShardRecord, float]] = {}  # id -> record, time.time()
        self.dropped: list[str] = []  # committed, but another writer's attempt came first
        self.refusal: Exception | None = None  # the rows' own failure (REFUSALS): the job's
        self.on_commit: Callable[[], None] | None = None  # after each commit, on its thread
        self._lock = threading.Lock()  # the taking of plans against `close`
        self._closed = False
        self._stop = threading.Event()
        # The shard in hand: its plan, when it started, rows done, seconds it may take.
        self._plan, self._t0, self._rows, self._budget = plans[0], 0.0, 0, None
        self._thread = threading.Thread(target=self._run, name="driver-shard", daemon=True)
        self._thread.start()

    def close(self) -> list[ShardPlan]:
        """Take no more shards; the ones taken (committed, in hand, or given back)."""
        with self._lock:
            self._closed = True
            return list(self._taken)

    def taken(self) -> list[ShardPlan]:
        """The plans it took so far (committed, in hand, or given back), in plan order."""
        with self._lock:
            return list(self._taken)

    def running(self) -> bool:
        """Whether its thread still works (on a shard, or about to take the next)."""
        return self._thread.is_alive()

    def wait(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for its thread to end: whether it has."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def committed(self) -> dict[str, tuple[ShardRecord, float]]:
        """shard id -> (its committed record, time.time() of the commit), so far."""
        with self._lock:
            return dict(self._committed)

    def computed(self, plans: list[ShardPlan]) -> bool:
        """Whether it is done, and committed every one of `plans` (no worker is needed)."""
        return not self.running() and self.committed().keys() >= {p.shard_id for p in plans}

    def result(self) -> dict[str, tuple[ShardRecord, float]]:
        """Wait for the shards taken; `committed()` (the others go to the workers)."""
        self._thread.join()
        return self.committed()

    def stop(self) -> dict[str, tuple[ShardRecord, float]]:
        """`result`, abandoning the shard in hand at its next batch (a job that ends early)."""
        self._stop.set()
        self.close()
        return self.result()

    def _next(self) -> ShardPlan | None:
        """The next plan, taken; its budget: none when the workers would compute the plans
        left in fewer rounds (`cluster.num_workers` shards at a time, all of one size)
        without it, else `BUDGET_S` of projected work."""
        with self._lock:
            left = len(self._plans) - len(self._taken)
            if self._closed or self._stop.is_set() or STOPPING.is_set() or not left:
                return None  # STOPPING: the process was told to stop (Ctrl-C, SIGTERM)
            plan = self._plans[len(self._taken)]
            self._taken.append(plan)
        spares_a_round = (left - 1) % max(self._cfg.cluster.num_workers, 1) == 0
        self._plan, self._rows, self._budget = plan, 0, None if spares_a_round else BUDGET_S
        return plan

    def _run(self) -> None:
        try:
            while (plan := self._next()) is not None and self._one(plan):
                pass
        finally:
            self._replica = self._dataset = None  # not needed again

    def _one(self, plan: ShardPlan) -> bool:
        """Compute and commit `plan`; False when it went back to the workers."""
        t0 = self._t0 = time.perf_counter()
        try:
            record = self._compute(plan)
            with self._landing:
                self._land(plan, record)
        except _Stopped as e:
            log.info("shard %s goes to the workers: %s", plan.shard_id, e)
            return False
        except REFUSALS as e:
            self.refusal = e  # the job's error now: it takes no other shard
            return False
        except Exception as e:  # noqa: BLE001 -- a worker computes it again (and fails as it should)
            log.info("the driver's shard %s failed (%s): the workers compute it", plan.shard_id, e)
            return False
        log.info("the driver indexed shard %s in %.2f s", plan.shard_id, time.perf_counter() - t0)
        return True

    def _land(self, plan: ShardPlan, record: ShardRecord) -> None:
        """Commit `plan`'s written `record` and say so (`on_commit`): also for a job that
        ends early (`stop`), whose shard is worth keeping; not once the process stops
        (Ctrl-C, SIGTERM), whose progress record is ended."""
        if STOPPING.is_set():
            raise _Stopped("the job ends")
        self._index.commit([record])
        self.dropped += self._index.not_kept([record])
        with self._lock:
            self._committed[plan.shard_id] = (record, time.time())
        if self.on_commit is not None:
            self.on_commit()

    def _compute(self, plan: ShardPlan) -> ShardRecord:
        with as_a_worker(self._cfg, self._replica) as computer:
            return index_rows(
                computer,
                self._dataset,
                self._index,
                plan,
                self._cfg.index.batch_size,
                Phases(),
                on_batch=self._check,
            )

    def _check(self, rows: int) -> None:
        if self._stop.is_set() or STOPPING.is_set():
            raise _Stopped("the job ends")
        self._rows += rows
        if self._budget is not None and self._rows == rows:  # the first batch: project
            projected = (time.perf_counter() - self._t0) * self._plan.rows / rows
            if projected > self._budget:
                raise _Stopped(f"about {projected:.1f} s of work, more than {self._budget} s")


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
        """The driver takes no more shards (a worker is ready, or it computed them all)."""
        if self.local is not None:
            self.mine = self.local.close()

    def computed(self, plans: list[ShardPlan]) -> bool:
        """Whether the driver computed and committed every one of `plans`."""
        return self.local is not None and self.local.computed(plans)

    def others(self, plans: list[ShardPlan]) -> list[ShardPlan]:
        """The workers' shards: all but the driver's, save those it already gave back."""
        if self.local is None:
            return plans
        running = self.local.running()  # before `committed`: a commit after it is seen
        done = self.local.committed()
        self.awaited = [p for p in self.mine if p.shard_id not in done] if running else []
        skipped = done.keys() | {p.shard_id for p in self.awaited}
        return [p for p in plans if p.shard_id not in skipped]

    def returned(self) -> list[ShardPlan]:
        """After the workers' shards: those of the driver's it gave back since `others`
        (this waits for the driver). Every commit of the driver's is counted by then, also
        those made after the last count of the wait for workers, which they ended."""
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
