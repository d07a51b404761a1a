"""GradientWorker: one model replica that turns shards of training rows into index files."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch

from grass_dist import assembly
from grass_dist.build import build_dataset
from grass_dist.config import JobConfig
from grass_dist.errors import ModelMismatchError
from grass_dist.gradients.computer import GradientComputer, PhiBlock
from grass_dist.index import ShardRecord
from grass_dist.models.state import state_hash
from grass_dist.runtime import compute_thread
from grass_dist.runtime.cluster import lanes_for
from grass_dist.runtime.executors import run_call
from grass_dist.runtime.faults import FaultInjector
from grass_dist.runtime.overlap import Phases

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardPlan:
    """Training rows [start, end) processed and committed as one unit."""

    shard_id: str
    start: int
    end: int

    @property
    def rows(self) -> int:
        return self.end - self.start


def shard_id(start: int, end: int) -> str:
    return f"{start:012d}-{end:012d}"


def plan_shards(n_rows: int, shard_size: int, committed: dict[str, ShardRecord]) -> list[ShardPlan]:
    """Shards covering the rows of [0, n_rows) that no committed shard covers yet.

    Each run of uncovered rows splits into the fewest shards of at most `shard_size` rows,
    of equal sizes (the larger ones first when they differ by one): 200 rows at 128 make
    two shards of 100, not 128 and 72, so that no worker waits on a short last shard. The
    same rows make the same shards however many workers run them, and a resumed job plans
    the shards its first run planned and did not commit.
    """
    covered = sorted((r.start, r.end) for r in committed.values())
    plans, cursor = [], 0
    for start, end in [*covered, (n_rows, n_rows)]:
        gap = min(start, n_rows) - cursor
        if gap > 0:
            pieces = -(-gap // shard_size)
            size, larger = divmod(gap, pieces)
            for i in range(pieces):
                hi = cursor + size + (i < larger)
                plans.append(ShardPlan(shard_id(cursor, hi), cursor, hi))
                cursor = hi
        cursor = max(cursor, end)
    return plans


@dataclass(frozen=True)
class ShardResult:
    """A written (not yet committed) shard and where and how long it took."""

    record: ShardRecord
    worker_id: int
    node_id: str
    seconds: dict[str, float]  # phase (load, compute, write) -> seconds


def pick_device(gpu_ids: list) -> tuple[torch.device, str | None]:
    """The GPU Ray assigned to this actor, else the CPU, with the reason for a fallback."""
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda", 0), None  # Ray sets CUDA_VISIBLE_DEVICES to our GPU
    if gpu_ids:
        return torch.device("cpu"), f"given GPU {gpu_ids} but CUDA is unavailable: using the CPU"
    return torch.device("cpu"), None


def index_rows(
    computer: GradientComputer,
    dataset: Any,
    index: Any,
    plan: ShardPlan,
    batch_size: int,
    phases: Phases,
    before_compute: Callable[[], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ShardRecord:
    """One shard's rows of `dataset` through `computer` into a new (uncommitted) file of
    `index`, timed as `phases` load, compute and write: a worker's shard call, and the
    driver's own shards (`runtime.local_shard`)."""
    sid = plan.shard_id
    with phases.run(sid, "load"):
        loaded = computer.load_rows(
            dataset, range(plan.start, plan.end), batch_size, "data.train rows"
        )
    with phases.run(sid, "compute"):
        if before_compute is not None:
            before_compute()
        block = compute_thread.call(computer.phi_loaded, loaded, on_batch=on_batch)
    with phases.run(sid, "write"):
        return index.write_shard(
            sid, plan.start, plan.end, block.row_ids, block.keys, block.phi, loaded.digests
        )


def phi_rows(
    computer: GradientComputer,
    dataset: Any,
    start: int,
    end: int,
    batch_size: int,
    phases: Phases | None = None,
    key: str = "phi",
    which: str = "query",
) -> PhiBlock:
    """phi of rows [start, end) of `dataset` through `computer`, returned rather than
    stored, timed as `phases` load and compute: a worker's query call, and the driver's
    (`runtime.local_shard.driver_phi`). Errors name the rows as data.<which>'s."""
    phases = Phases() if phases is None else phases
    with phases.run(key, "load"):
        loaded = computer.load_rows(dataset, range(start, end), batch_size, f"data.{which} rows")
    with phases.run(key, "compute"):
        return compute_thread.call(computer.phi_loaded, loaded)


class GradientWorker:
    """Holds the model, task, datasets and compressors; computes and writes shards."""

    def __init__(
        self,
        job: dict[str, Any],
        model_hash: str | None,
        threads: int,
        worker_id: int = 0,
        objects: dict[str, Any] | None = None,
        datasets: tuple[str, ...] = (),
    ):
        """With `model_hash` None only the cheap part runs (threads, config, device, and the
        `datasets` named, e.g. ('train',)) and `start(model_hash)` builds the replica later: a
        pool starts such actors while the driver still checks the job, so their process start,
        imports and data loading overlap its checks instead of delaying the first shard.
        """
        in_ray = ray.is_initialized()
        if in_ray and ray.get_runtime_context().get_actor_id() is not None:
            # An actor owns its process: use the CPUs it was given. A worker built in the
            # caller's process leaves the caller's thread count alone.
            compute_thread.call(torch.set_num_threads, threads)
        self.job = JobConfig.from_cfg(job)
        self.threads = threads
        self.worker_id = worker_id
        self.objects = objects
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()] if in_ray else []
        self.node_id = ray.get_runtime_context().get_node_id() if in_ray else "local"
        self.device, self.device_note = pick_device(self.gpu_ids)
        self.phases = Phases()
        self.datasets: dict[str, Any] = {}
        self._datasets_lock = threading.Lock()  # shard calls run on several threads
        if datasets:
            assembly.receive(objects)  # a dataset may be an in-memory object (api)
        for which in datasets:
            self._dataset(which)
        if model_hash is not None:
            self.start(model_hash)

    def start(self, model_hash: str) -> dict[str, Any]:
        """Build the replica (the index must exist), check it is the driver's model, and
        return `describe()`. On the compute thread, as the replica's compute will be."""
        return compute_thread.call(self._start, model_hash)

    def _start(self, model_hash: str) -> dict[str, Any]:
        assembly.receive(self.objects)  # in-memory model/task/data from the driver (api)
        # Learned masks come from the index, so queries use the masks the index was built with.
        self.index = assembly.open_index(self.job)
        parts = assembly.replica(self.job, self.index)
        found = state_hash(parts.model)
        if found != model_hash:
            raise ModelMismatchError(
                f"worker {self.worker_id} built a model whose weights differ from the "
                f"driver's (sha256 {found[:12]} vs {model_hash[:12]}): make model._target_ "
                f"deterministic (load saved weights) so every replica is the same model; in "
                f"the Python API, pass the trained model itself, not a class or factory that "
                f"initialises it at random"
            )
        if self.device_note:
            log.warning("worker %d %s", self.worker_id, self.device_note)  # once, at start
        lanes = lanes_for(self.job.cluster, self.threads)
        self.computer = GradientComputer(
            parts.model, parts.task, parts.compressors, self.device, lanes
        )
        self.faults = FaultInjector(self.job.faults, self.index.store)
        return self.describe()

    def _dataset(self, which: str):
        with self._datasets_lock:
            if which not in self.datasets:
                self.datasets[which] = build_dataset(self.job, which)
            return self.datasets[which]

    def describe(self) -> dict[str, Any]:
        """Where this worker runs: answers once the actor is placed and built."""
        return {
            "worker_id": self.worker_id,
            "node_id": self.node_id,
            "gpu_ids": self.gpu_ids,
            "device": str(self.device),
            "device_note": self.device_note,
            "lanes": self.computer.lanes if hasattr(self, "computer") else None,
        }

    def index_shard(self, plan: ShardPlan) -> ShardResult:
        """Compute phi for the shard's rows and write one new (uncommitted) shard file.

        Load and write run outside the compute slot (see overlap.py), so concurrent calls
        on this actor overlap them with another shard's compute.
        """
        record = index_rows(
            self.computer,
            self._dataset("train"),
            self.index,
            plan,
            self.job.index.batch_size,
            self.phases,
            before_compute=self.faults.shard_delay,
            on_batch=lambda n: self.faults.after_rows(n, self.worker_id),
        )
        return ShardResult(record, self.worker_id, self.node_id, self.phases.seconds(plan.shard_id))

    def phi(self, which: str, start: int, end: int) -> PhiBlock:
        """phi of rows [start, end) of data.<which>, returned rather than stored."""
        return phi_rows(
            self.computer,
            self._dataset(which),
            start,
            end,
            self.job.index.batch_size,
            self.phases,
            f"{which}:{start}-{end}",
            which,
        )

    def run(self, fn: Callable, *args: Any) -> Any:
        """fn(*args) in this process on its threads: a reducer stage's map call, run on this
        worker once it is idle and lent to the stage (see runtime/executors.py)."""
        return run_call(fn, self.threads, *args)

    def timeline(self) -> list:
        """Recent PhaseSpans (load / compute / write per shard), for overlap diagnostics."""
        return self.phases.spans()
