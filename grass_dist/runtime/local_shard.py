"""The driver's own shards: shards of an index computed in the driver's process, on an
embedded Ray on the CPU.

A `jobs/` door's driver builds the model, task, data and compressors to check the job
(`pipeline.prepare`) and would then wait seconds for Ray's processes and the workers' (each
imports torch and builds its replica). `LocalShard` computes the uncommitted shards there,
front of the plan first: on the CPU, with a worker's thread count and the worker's code
(`worker.index_rows`), so the index holds the same bits whichever process computed them.
It commits each as soon as it is written (a commit keeps a shard's first committed attempt).

Where the pool would not grow (`member`), the driver is one of the job's
`cluster.num_workers` computing processes until the index's last shard: Ray starts one
worker fewer (`ray_workers`), and the driver and the workers take the shards from one queue
(`hand_out`) until none is left. A worker of its own would compute on the same machine with
the same threads, and its start (its imports and replica: seconds of CPU) would only take
the CPUs from the others'. With one worker the driver computes alone (`alone`).

Where the pool may grow, the driver takes the next shard only as long as no worker is
ready: the index stage `close`s it when the first worker is, and the workers take the
shards it has not taken. Its shards then compete with the workers' start for the CPUs, so
it keeps one only where that pays. A shard that spares the workers a round of shards
(with one worker, every shard; with two workers and three shards left, the first) is
finished however long it takes: the job ends a round sooner. Any other shard goes back to
the workers when its first batch projects more than `BUDGET_S` of work: with two workers
and two shards, the driver's shard would only delay the worker that computes the other.

Either way, a shard that the rows themselves make fail (a NaN loss or gradient, rows the
task cannot batch, items it does not take: `REFUSALS`) fails the job as a worker's would,
without waiting for one to compute it again: it runs the same code on the same bits. A
shard that fails otherwise goes back to the workers (the driver's process is not a
worker's), and so does one stopped because the job ends.

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
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

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
    driver_member,
    lanes_for,
    threads_for,
)
from grass_dist.runtime.overlap import Phases
from grass_dist.runtime.worker import ShardPlan, index_rows, phi_rows

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


def member(cfg: JobConfig) -> bool:
    """Whether the driver is one of the job's `cluster.num_workers` computing processes for
    the whole index stage: `wanted`, and a pool that would not grow
    (`cluster.driver_member`). Ray then starts `ray_workers` workers, and the driver and
    they take the shards from one queue (`LocalShard.hand_out`) until none is left: on the
    driver's machine, a worker of its own would only repeat the driver's start-up (its
    imports and its model, seconds of CPU each) to compute what the driver can. With one
    worker it is `alone`."""
    return driver_member(cfg) and not torch.cuda.is_available()


def ray_workers(cfg: JobConfig) -> int:
    """Workers a job starts on Ray: `cluster.num_workers` less the driver where it is one
    of them (`member`, and it computes shards: `Job._member`; at least one, for the shards
    a driver that is `alone` gives back)."""
    n = cfg.cluster.num_workers
    return max(n - 1, 1) if member(cfg) else n


class LocalShard:
    """`plans`' rows of `dataset`, front first, through the driver's `replica` into `index`,
    on a daemon thread started now, until `close` or `stop`, or the process stops
    (`cluster.STOPPING`). Each commit and its `on_commit` run holding `landing` (the job's
    progress record's lock: a record that Ctrl-C ends waits for a commit in hand, and no
    commit starts after it). Where the driver is a `member` of the job's computing
    processes, the workers take the plans from the same queue (`hand_out`), and the driver
    keeps every shard it takes."""

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
        self._next_plan = 0  # plans before it are taken, by the driver or the workers
        self._taken: list[ShardPlan] = []  # the driver's, started, in plan order
        self.member = member(cfg)
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

    def hand_out(self) -> ShardPlan | None:
        """The next plan, for a worker (`member`): the driver will not take it; None when
        every plan is taken."""
        with self._lock:
            if self._next_plan == len(self._plans):
                return None
            self._next_plan += 1
            return self._plans[self._next_plan - 1]

    def queued(self) -> list[ShardPlan]:
        """Every plan it was given, taken or not."""
        return list(self._plans)

    def left(self) -> int:
        """How many plans nobody has taken yet."""
        with self._lock:
            return len(self._plans) - self._next_plan

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
        """The next plan, taken; its budget: none for a `member`, or where the workers
        would compute the plans left in fewer rounds (`cluster.num_workers` shards at a
        time, all of one size) without it, else `BUDGET_S` of projected work."""
        with self._lock:
            left = len(self._plans) - self._next_plan
            if self._closed or self._stop.is_set() or STOPPING.is_set() or not left:
                return None  # STOPPING: the process was told to stop (Ctrl-C, SIGTERM)
            plan = self._plans[self._next_plan]
            self._next_plan += 1
            self._taken.append(plan)
        spares_a_round = (left - 1) % max(self._cfg.cluster.num_workers, 1) == 0
        keep = self.member or spares_a_round
        self._plan, self._rows, self._budget = plan, 0, None if keep else BUDGET_S
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
