"""The driver's own shards (runtime/local_shard.py): the same bits as a worker's, taken
beside the workers (a pool that would not grow) or until the first worker is ready, and
given back to the workers when stopped or failed."""

import threading
import time

import numpy as np
import pytest
import torch

from grass_dist import assembly, pipeline
from grass_dist.build import build_dataset, build_model, build_task
from grass_dist.config import JobConfig, resolve
from grass_dist.errors import NonFiniteLossError
from grass_dist.index import GradientIndex
from grass_dist.job import Job
from grass_dist.runtime import driver_shard, job_actors, local_shard
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
def test_the_drivers_shards_are_a_workers_shards_bit_for_bit(
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
    up = by_worker.startup_s  # the index stage waited for a worker
    assert up.keys() == {"prepared", "ray", "first_worker"}
    assert 0 < up["prepared"] < up["first_worker"] <= by_worker.first_shard_s

    job = pipeline.prepare_started(
        compose_cfg(tmp_path, f"store.url={tmp_path / 'd'}", *compression)
    )
    assert job._local is not None
    # As when Ray and the workers take longer than the whole index: unclosed, the driver
    # takes every shard, one after another.
    done = job._local.result()
    plans = plan_shards(90, 32, {})
    assert job._local.taken() == plans and done.keys() == {p.shard_id for p in plans}
    assert job.index.committed() == {sid: record for sid, (record, _) in done.items()}
    started = job_actors.ready_pool
    done_then = []  # the progress record's shards done when the wait for a worker ended

    def pool(job, unless=None):
        started_pool = started(job, unless)
        done_then.append(job.progress.doc["index"]["shards_done"])
        return started_pool

    monkeypatch.setattr(job_actors, "ready_pool", pool)
    try:
        summary = pipeline.run_index(job)
        assert not job._pool.ready  # the index stage waited for no worker
    finally:
        pipeline.shutdown(job)
    assert done_then == [3]  # counted while the workers started
    assert job.startup_s.keys() == {"prepared", "ray"}  # no stage waited for a worker
    assert 0 < job.startup_s["prepared"] < job.first_shard_s
    assert summary == {"computed_shards": 3, "skipped_shards": 0, "rows": 90, "driver_shards": 3}
    _assert_same_shards(_shards(job.cfg.index_url), _shards(by_worker.cfg.index_url))
    assert job.first_shard_s == min(at for _, at in done.values()) - job.started
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
    assert job._local is not None and len(job._local.result()) == 3
    committed_then = []
    start = job_actors.ReducerHandle.start
    monkeypatch.setattr(
        job_actors.ReducerHandle,
        "start",
        lambda self, why: committed_then.append(len(job.index.committed())) or start(self, why),
    )
    try:
        summary = pipeline.run_index(job, precondition_next=True)
        assert job._reducer is not None and job._reducer.started == 1
    finally:
        pipeline.shutdown(job)
    assert summary["driver_shards"] == 3 and summary["computed_shards"] == 3
    assert committed_then == [3]  # the driver's shards, before any worker could commit


class _Gated:
    """A dataset whose reads wait for `go`, or fail with `error`; row `nan_row` holds a NaN."""

    def __init__(self, inner, error: Exception | None = None, nan_row: int | None = None):
        self.inner, self.error, self.go = inner, error, threading.Event()
        self.nan_row = nan_row

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if self.error is not None:
            raise self.error
        self.go.wait()
        x, y = self.inner[i]
        return (torch.full_like(x, float("nan")), y) if i == self.nan_row else (x, y)


def _local_job(tmp_path, *overrides, error: Exception | None = None, nan_row: int | None = None):
    """A job without the doors' start-up, and a LocalShard of its shards whose rows wait
    for `go` (or fail with `error`; row `nan_row` holds a NaN)."""
    job = pipeline.prepare(compose_cfg(tmp_path, "index.batch_size=1", *overrides))  # batches
    model = build_model(job.cfg)
    task = build_task(job.cfg)
    train = build_dataset(job.cfg, "train")
    compressors = assembly.driver_compressors(job.cfg, model, task, train)
    data = _Gated(train, error, nan_row)
    plans = plan_shards(job.n_train, job.cfg.index.shard_size, {})
    replica = assembly.Replica(model, task, compressors)
    job._local = LocalShard(job.cfg, replica, data, job.index, plans)
    job._member = job._local.member  # as `job._prepare_local` sets it
    return job, data


def _run_index(job):
    try:
        return pipeline.run_index(job)
    finally:
        pipeline.shutdown(job)


def test_the_workers_take_the_other_shards_while_the_driver_finishes_its_own(
    ray_session, tmp_path, monkeypatch
):
    # A pool that may grow: the driver takes shards until the first worker is ready.
    monkeypatch.setattr(local_shard, "BUDGET_S", float("inf"))  # its rows wait: no projection
    job, data = _local_job(tmp_path, "cluster.max_workers=3")
    local = job._local
    assert not local.member
    first_commit = Job.first_shard_committed

    def worker_committed(self, *args):  # the driver's rows load only after a worker's commit
        data.go.set()
        first_commit(self, *args)

    monkeypatch.setattr(Job, "first_shard_committed", worker_committed)
    summary = _run_index(job)
    assert summary == {"computed_shards": 3, "skipped_shards": 0, "rows": 90, "driver_shards": 1}
    first = plan_shards(90, 32, {})[0]
    assert local.taken() == [first]  # closed when the first worker was ready
    record, committed_at = local.committed()[first.shard_id]
    assert job.index.committed()[first.shard_id] == record  # the driver's attempt
    assert job.first_shard_s < committed_at - job.started  # a worker's came first
    ix = read_progress(job.index.store, job.job_id)["index"]
    assert ix["shards_done"] == 3 and ix["rows_done"] == 90


def test_a_member_driver_takes_shards_beside_the_workers_from_one_queue(
    ray_session, tmp_path, monkeypatch
):
    # Two workers in a pool that would not grow: the driver is one of the two computing
    # processes, so Ray starts one worker, and the driver goes on taking shards once it is
    # ready, from the queue the worker takes its own from: each shard once, by one of them.
    job, data = _local_job(tmp_path, "index.shard_size=10")
    local = job._local
    assert local.member and local_shard.ray_workers(job.cfg) == 1
    first_commit = Job.first_shard_committed

    def worker_committed(self, *args):  # the driver's rows load only after a worker's commit
        data.go.set()
        first_commit(self, *args)

    monkeypatch.setattr(Job, "first_shard_committed", worker_committed)
    try:
        summary = pipeline.run_index(job)
        assert job._pool.created == 1  # one worker started: the driver is the other
    finally:
        pipeline.shutdown(job)
    plans = plan_shards(90, 10, {})
    mine = local.taken()
    assert summary == {
        "computed_shards": 9,
        "skipped_shards": 0,
        "rows": 90,
        "driver_shards": len(mine),
    }
    assert mine[0] == plans[0] and len(mine) > 1  # it went on once the worker was ready
    assert len(mine) < len(plans)  # and the worker computed the others
    committed = job.index.committed()
    assert committed.keys() == {p.shard_id for p in plans}
    assert local.committed().keys() == {p.shard_id for p in mine}  # its attempts are the index's
    assert all(committed[sid] == record for sid, (record, _) in local.committed().items())
    ix = read_progress(job.index.store, job.job_id)["index"]
    assert ix["shards_done"] == 9 and ix["rows_done"] == 90


def test_driver_commits_made_as_the_wait_for_workers_ends_are_counted(
    ray_session, tmp_path, monkeypatch
):
    # The start-up wait counts the driver's commits, then asks whether it computed every
    # shard; commits that land between the two end the wait uncounted, and the stage must
    # still count them (summary, first shard, progress).
    monkeypatch.setattr(local_shard, "BUDGET_S", float("inf"))  # its rows wait: no projection
    job, data = _local_job(tmp_path)
    computed = driver_shard.DriverShard.computed

    def all_in_since_the_count(self, plans):  # the commits land right after the count
        data.go.set()
        self.local.result()
        return computed(self, plans)

    monkeypatch.setattr(driver_shard.DriverShard, "computed", all_in_since_the_count)
    summary = _run_index(job)
    assert summary == {"computed_shards": 3, "skipped_shards": 0, "rows": 90, "driver_shards": 3}
    assert job.first_shard_s is not None
    ix = read_progress(job.index.store, job.job_id)["index"]
    assert ix["shards_done"] == 3 and ix["rows_done"] == 90


def test_a_closed_driver_finishes_the_shard_in_hand_and_takes_no_other(tmp_path, monkeypatch):
    monkeypatch.setattr(local_shard, "BUDGET_S", float("inf"))  # its rows wait: no projection
    job, data = _local_job(tmp_path)
    local = job._local
    while not local.taken():  # its first shard's rows wait
        time.sleep(0.01)
    first = plan_shards(90, 32, {})[0]
    assert local.close() == [first]
    data.go.set()
    assert local.result().keys() == {first.shard_id} and local.taken() == [first]
    assert job.index.committed().keys() == {first.shard_id}


@pytest.mark.parametrize(
    ("workers", "kept"), [(1, 3), (2, 1), (3, 0)], ids=["1 worker", "2 workers", "3 workers"]
)
def test_the_driver_keeps_a_long_shard_only_where_it_spares_the_workers_a_round(
    tmp_path, monkeypatch, workers, kept
):
    # Three shards, each projecting more work than the budget, and a pool that may grow (a
    # driver that is a member of a fixed one keeps every shard it takes). One worker: each
    # one the driver computes is a round fewer. Two: the first leaves two shards, one round,
    # instead of three, two rounds; the second would leave one shard, still a round. Three:
    # none spares a round, and the first goes back at once.
    monkeypatch.setattr(local_shard, "BUDGET_S", 0.0)
    grows = f"cluster.max_workers={workers + 1}"
    job, data = _local_job(tmp_path, f"cluster.num_workers={workers}", grows)
    assert not job._local.member
    data.go.set()
    plans = plan_shards(90, 32, {})
    assert job._local.result().keys() == {p.shard_id for p in plans[:kept]}
    assert job._local.taken() == plans[: kept + 1]  # and the one it gave back, if any
    assert job.index.committed().keys() == {p.shard_id for p in plans[:kept]}


@pytest.mark.parametrize("how", ["stopped", "failed"])
def test_a_driver_shard_stopped_or_failed_goes_to_the_workers(ray_session, tmp_path, how):
    job, data = _local_job(
        tmp_path, error=RuntimeError("disk on fire") if how == "failed" else None
    )
    local = job._local
    if how == "stopped":  # a job that ends before its index stage
        stopping = threading.Thread(target=local.stop)
        stopping.start()
        while not local._stop.is_set():
            time.sleep(0.01)
    data.go.set()  # the rows load only now: a stop is seen at the first batch
    assert local.result() == {} and not local.running() and job.index.committed() == {}
    assert local.taken() == plan_shards(90, 32, {})[:1]  # and no other after it
    if how == "stopped":
        stopping.join()
    summary = _run_index(job)
    assert summary == {"computed_shards": 3, "skipped_shards": 0, "rows": 90, "driver_shards": 0}
    assert sorted(_shards(job.cfg.index_url)) == [p.shard_id for p in plan_shards(90, 32, {})]


def test_a_driver_shard_whose_row_has_a_nan_loss_fails_the_job_without_waiting_for_a_worker(
    ray_session, tmp_path
):
    # A worker runs the same code on the same bits and would fail the same way: the driver's
    # refusal is the job's error as soon as the index stage looks, not after a worker's start.
    job, data = _local_job(tmp_path, nan_row=40)
    data.go.set()
    while job._local.running():
        time.sleep(0.01)
    with pytest.raises(NonFiniteLossError, match=r"data\.train rows \[40\]"):
        _run_index(job)
    assert "first_worker" not in job.startup_s
    first = plan_shards(90, 32, {})[0]
    assert job.index.committed().keys() == {first.shard_id}  # the shard before it stays
    assert job.first_shard_s is not None  # and counted


def test_only_an_embedded_cpu_job_without_faults_indexes_on_the_driver(tmp_path):
    def wanted(*overrides):
        return local_shard.wanted(JobConfig.from_cfg(resolve(compose_cfg(tmp_path, *overrides))))

    assert wanted()
    assert not wanted("cluster.driver_shard=false")
    assert not wanted("cluster.address=auto")
    assert not wanted("faults.kill_worker_after_rows=10")
    assert not wanted("faults.shard_delay_s=0.5")


def test_with_one_worker_that_would_not_grow_the_driver_indexes_alone(tmp_path):
    def alone(*overrides):
        return local_shard.alone(JobConfig.from_cfg(resolve(compose_cfg(tmp_path, *overrides))))

    assert alone("cluster.num_workers=1")
    assert alone("cluster.num_workers=1", "cluster.max_workers=1")
    assert not alone("cluster.num_workers=2")
    assert not alone("cluster.num_workers=1", "cluster.max_workers=3")  # it would grow
    assert not alone("cluster.num_workers=1", "cluster.driver_shard=false")
    assert not alone("cluster.num_workers=1", "cluster.address=auto")


def test_a_driver_alone_starts_no_worker(ray_session, tmp_path):
    job, data = _local_job(tmp_path, "cluster.num_workers=1")
    data.go.set()
    try:
        summary = pipeline.run_index(job)
        assert job._pool is None and not job._spares  # none started, none left to stop
    finally:
        pipeline.shutdown(job)
    assert summary == {"computed_shards": 3, "skipped_shards": 0, "rows": 90, "driver_shards": 3}
    assert "first_worker" not in job.startup_s
    ix = read_progress(job.index.store, job.job_id)["index"]
    assert ix["shards_done"] == 3 and ix["rows_done"] == 90


def test_a_driver_alone_starts_a_worker_for_the_shards_it_gave_back(ray_session, tmp_path):
    # A failure of the driver's process, not of the rows: a worker computes what it left.
    job, data = _local_job(tmp_path, "cluster.num_workers=1", error=RuntimeError("disk on fire"))
    data.go.set()
    summary = _run_index(job)
    assert summary == {"computed_shards": 3, "skipped_shards": 0, "rows": 90, "driver_shards": 0}
    assert "first_worker" in job.startup_s
    assert sorted(_shards(job.cfg.index_url)) == [p.shard_id for p in plan_shards(90, 32, {})]


def test_a_job_stopped_while_ray_starts_records_the_drivers_commits(tmp_path):
    # Ctrl-C (or a failure) before the index stage counts anything: the driver's shards are
    # committed, and its progress record says so, as a rerun will skip them.
    from grass_dist import job as job_module
    from grass_dist.runtime.progress import interrupt_running

    raw = resolve(compose_cfg(tmp_path))
    job = job_module._prepare_local(raw, True, False, time.time())
    done = job._local.result()  # no Ray, no stage: the driver takes every shard
    plans = plan_shards(90, 32, {})
    assert done.keys() == {p.shard_id for p in plans}
    interrupt_running(KeyboardInterrupt())
    doc = read_progress(job.index.store, job.job_id)
    assert doc["state"] == "failed" and doc["stages"] == {}
    ix = doc["index"]
    assert (ix["shards_total"], ix["shards_skipped"], ix["shards_done"]) == (3, 0, 3)
    assert (ix["rows_total"], ix["rows_todo"], ix["rows_done"]) == (90, 90, 90)
    assert list(ix["shards_by_node"].values()) == [3]  # "driver", or Ray's node if it is up
    assert ix["rows_per_s"] < 1e6  # since the driver began, not since the count
    assert doc["first_shard_s"] == round(job.first_shard_s, 3) > 0
