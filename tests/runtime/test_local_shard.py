"""The driver's own first shard (runtime/local_shard.py): the same bits as a worker's, and
given back to the workers when it is stopped or fails."""

import threading
import time

import numpy as np
import pytest

from grass_dist import assembly, pipeline
from grass_dist.build import build_dataset, build_model, build_task
from grass_dist.config import JobConfig, resolve
from grass_dist.index import GradientIndex
from grass_dist.job import Job
from grass_dist.runtime import local_shard
from grass_dist.runtime.local_shard import LocalShard
from grass_dist.runtime.progress import read_progress
from grass_dist.runtime.worker import plan_shards
from tests.conftest import compose_cfg
from tests.test_end_to_end_compressors import SELECTIVE

pytestmark = pytest.mark.integration


def _shards(url: str) -> dict[str, tuple]:
    """shard id -> (row ids, keys, {layer: phi}) of every committed shard."""
    index = GradientIndex.open(url)
    return {
        rec.shard_id: (data.row_ids, data.keys, data.phi)
        for rec, data in ((r, index.read(r)) for r in index.committed().values())
    }


def _assert_same_shards(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for sid, (rows, keys, phi) in a.items():
        assert np.array_equal(rows, b[sid][0]) and keys == b[sid][1]
        assert phi.keys() == b[sid][2].keys()
        for layer in phi:
            assert np.array_equal(phi[layer], b[sid][2][layer]), (sid, layer)  # bit-identical


@pytest.mark.parametrize("compression", [[], SELECTIVE], ids=["factgrass", "selective"])
def test_the_drivers_shard_is_a_workers_shard_bit_for_bit(
    ray_session, tmp_path, monkeypatch, compression
):
    monkeypatch.setattr(local_shard, "BUDGET_S", float("inf"))  # however loaded the machine
    by_worker = pipeline.prepare_started(
        compose_cfg(
            tmp_path, f"store.url={tmp_path / 'w'}", "cluster.driver_shard=false", *compression
        )
    )
    assert by_worker._local is None
    try:
        summary = pipeline.run_index(by_worker)
    finally:
        pipeline.shutdown(by_worker)
    assert summary["driver_shards"] == 0

    job = pipeline.prepare_started(
        compose_cfg(tmp_path, f"store.url={tmp_path / 'd'}", *compression)
    )
    assert job._local is not None
    first = job._local.plan.shard_id
    record = job._local.result()  # as when Ray and the workers take longer than one shard
    assert record is not None and job.index.committed()[first] == record
    try:
        summary = pipeline.run_index(job)
    finally:
        pipeline.shutdown(job)
    assert summary == {"computed_shards": 3, "skipped_shards": 0, "rows": 90, "driver_shards": 1}
    _assert_same_shards(_shards(job.cfg.index_url), _shards(by_worker.cfg.index_url))
    progress = read_progress(job.index.store, job.job_id)
    assert progress["first_shard_s"] == round(job.first_shard_s, 3)
    ix = progress["index"]
    assert ix["shards_done"] == ix["shards_total"] == 3
    assert ix["rows_done"] == ix["rows_todo"] == 90


def test_with_the_drivers_shard_committed_the_reducer_starts_with_the_index_stage(
    ray_session, tmp_path, monkeypatch
):
    # The job's first shard is in: the reducer's process starts before any worker commits,
    # to be ready when the precondition stage starts.
    monkeypatch.setattr(local_shard, "BUDGET_S", float("inf"))
    job = pipeline.prepare_started(compose_cfg(tmp_path, f"store.url={tmp_path / 'r'}"))
    assert job._local is not None and job._local.result() is not None
    committed_then = []
    start = pipeline.ReducerHandle.start
    monkeypatch.setattr(
        pipeline.ReducerHandle,
        "start",
        lambda self, why: committed_then.append(len(job.index.committed())) or start(self, why),
    )
    try:
        summary = pipeline.run_index(job, precondition_next=True)
        assert job._reducer is not None and job._reducer.started == 1
    finally:
        pipeline.shutdown(job)
    assert summary["driver_shards"] == 1 and summary["computed_shards"] == 3
    assert committed_then == [1]  # the driver's shard only


class _Gated:
    """A dataset whose reads wait for `go`, or fail with `error`."""

    def __init__(self, inner, error: Exception | None = None):
        self.inner, self.error, self.go = inner, error, threading.Event()

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if self.error is not None:
            raise self.error
        self.go.wait()
        return self.inner[i]


def _local_job(tmp_path, error: Exception | None = None):
    """A job without the doors' start-up, and a LocalShard of its first shard whose rows
    wait for `go` (or fail with `error`)."""
    job = pipeline.prepare(compose_cfg(tmp_path, "index.batch_size=1"))  # many batches
    model = build_model(job.cfg)
    task = build_task(job.cfg)
    train = build_dataset(job.cfg, "train")
    compressors = assembly.driver_compressors(job.cfg, model, task, train)
    data = _Gated(train, error)
    plan = plan_shards(job.n_train, job.cfg.index.shard_size, {})[0]
    replica = assembly.Replica(model, task, compressors)
    job._local = LocalShard(job.cfg, replica, data, job.index, plan)
    return job, data


def _run_index(job):
    try:
        return pipeline.run_index(job)
    finally:
        pipeline.shutdown(job)


def test_the_workers_take_the_other_shards_while_the_driver_finishes_its_own(
    ray_session, tmp_path, monkeypatch
):
    monkeypatch.setattr(local_shard, "BUDGET_S", float("inf"))  # its rows wait: no projection
    job, data = _local_job(tmp_path)
    local = job._local
    first_commit = Job.first_shard_committed

    def worker_committed(self, *args):  # the driver's rows load only after a worker's commit
        data.go.set()
        first_commit(self, *args)

    monkeypatch.setattr(Job, "first_shard_committed", worker_committed)
    summary = _run_index(job)
    assert summary == {"computed_shards": 3, "skipped_shards": 0, "rows": 90, "driver_shards": 1}
    assert job.index.committed()[local.plan.shard_id] == local.record  # the driver's attempt
    assert job.first_shard_s < local.committed_at - job.started  # a worker's came first
    ix = read_progress(job.index.store, job.job_id)["index"]
    assert ix["shards_done"] == 3 and ix["rows_done"] == 90


@pytest.mark.parametrize("how", ["stopped", "failed", "too long"])
def test_a_driver_shard_stopped_failed_or_too_long_goes_to_the_workers(
    ray_session, tmp_path, monkeypatch, how
):
    if how == "too long":  # its first batch projects more work than the driver's budget
        monkeypatch.setattr(local_shard, "BUDGET_S", 0.0)
    job, data = _local_job(tmp_path, RuntimeError("disk on fire") if how == "failed" else None)
    local = job._local
    if how == "stopped":  # a job that ends before its index stage
        stopping = threading.Thread(target=local.stop)
        stopping.start()
        while not local._stop.is_set():
            time.sleep(0.01)
    data.go.set()  # the rows load only now: a stop is seen at the first batch
    assert local.result() is None and local.given_back() and job.index.committed() == {}
    if how == "stopped":
        stopping.join()
    summary = _run_index(job)
    assert summary == {"computed_shards": 3, "skipped_shards": 0, "rows": 90, "driver_shards": 0}
    assert sorted(_shards(job.cfg.index_url)) == [p.shard_id for p in plan_shards(90, 32, {})]


def test_only_an_embedded_cpu_job_without_faults_indexes_on_the_driver(tmp_path):
    def wanted(*overrides):
        return local_shard.wanted(JobConfig.from_cfg(resolve(compose_cfg(tmp_path, *overrides))))

    assert wanted()
    assert not wanted("cluster.driver_shard=false")
    assert not wanted("cluster.address=auto")
    assert not wanted("faults.kill_worker_after_rows=10")
    assert not wanted("faults.shard_delay_s=0.5")
