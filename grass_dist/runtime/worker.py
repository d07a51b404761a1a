"""GradientWorker: one model replica that turns shards of training rows into index files."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from grass_dist.build import (
    build_dataset,
    build_layer_compressors,
    build_model,
    build_task,
    store_retry,
)
from grass_dist.config import JobConfig
from grass_dist.errors import ModelMismatchError
from grass_dist.gradients import GradientComputer, PhiBlock
from grass_dist.index import GradientIndex, ShardRecord
from grass_dist.models import state_hash

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
    """Shards covering the rows of [0, n_rows) that no committed shard covers yet."""
    covered = sorted((r.start, r.end) for r in committed.values())
    plans, cursor = [], 0
    for start, end in [*covered, (n_rows, n_rows)]:
        gap_end = min(start, n_rows)
        for lo in range(cursor, gap_end, shard_size):
            hi = min(lo + shard_size, gap_end)
            plans.append(ShardPlan(shard_id(lo, hi), lo, hi))
        cursor = max(cursor, end)
    return plans


def pick_device() -> torch.device:
    """The GPU Ray assigned to this actor, else the CPU (said once, with the reason)."""
    import ray

    gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU
    if gpu_ids:
        log.warning("worker was given GPU %s but CUDA is unavailable: computing on CPU", gpu_ids)
    return torch.device("cpu")


class GradientWorker:
    """Holds the model, task, datasets and compressors; computes and writes shards."""

    def __init__(self, job: dict[str, Any], model_hash: str, threads: int, worker_id: int = 0):
        torch.set_num_threads(threads)
        self.job = JobConfig.from_cfg(job)
        self.worker_id = worker_id
        model = build_model(self.job)
        found = state_hash(model)
        if found != model_hash:
            raise ModelMismatchError(
                f"worker {worker_id} built a model whose weights differ from the driver's "
                f"(sha256 {found[:12]} vs {model_hash[:12]}): make model._target_ deterministic "
                f"(load saved weights) so every replica is the same model"
            )
        self.device = pick_device()
        self.index = GradientIndex.open(
            self.job.index_url, self.job.store.storage_options, store_retry(self.job)
        )
        # Learned masks come from the index, so queries use the masks the index was built with.
        compressors = build_layer_compressors(self.job, model, self.index)
        self.computer = GradientComputer(model, build_task(self.job), compressors, self.device)
        self.datasets: dict[str, Any] = {}

    def _dataset(self, which: str):
        if which not in self.datasets:
            self.datasets[which] = build_dataset(self.job, which)
        return self.datasets[which]

    def index_shard(self, plan: ShardPlan) -> ShardRecord:
        """Compute phi for the shard's rows and write one new (uncommitted) shard file."""
        block = self.computer.phi_rows(
            self._dataset("train"), range(plan.start, plan.end), self.job.index.batch_size
        )
        return self.index.write_shard(
            plan.shard_id, plan.start, plan.end, block.row_ids, block.keys, block.phi
        )

    def phi(self, which: str, start: int, end: int) -> PhiBlock:
        """phi of rows [start, end) of data.<which>, returned rather than stored."""
        return self.computer.phi_rows(
            self._dataset(which), range(start, end), self.job.index.batch_size
        )

    def device_name(self) -> str:
        return str(self.device)
