"""The scheduler and the worker pool on a real Ray: how many shards a worker holds, where
the last ones go, how failures are reported, and workers that cannot start."""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest
import ray

from grass_dist.errors import BadRowsError, ConfigError, PlacementTimeoutError, WorkerStartError
from grass_dist.runtime.pool import ActorPool
from grass_dist.runtime.scheduler import SharedItems, run_items

pytestmark = pytest.mark.integration


@ray.remote(num_cpus=0.1, max_concurrency=8)
class _Probe:
    """A worker stand-in that records how many calls it ran at once (up to 8 allowed)."""

    def __init__(self, start_s: float = 0.0):
        self.running = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.start_s = start_s

    def describe(self) -> dict:
        time.sleep(self.start_s)  # how long this worker takes to become ready
        return {"node_id": ray.get_runtime_context().get_node_id(), "device": "cpu"}

    def work(self, item: int, seconds: float = 0.05) -> int:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(seconds)
        with self.lock:
            self.running -= 1
        return item

    def work_where(self, seconds: float) -> int:
        """Work for `seconds`; this worker's process id."""
        time.sleep(seconds)
        return os.getpid()

    def peak_calls(self) -> int:
        return self.peak

    def fail(self, item: int, seconds: float) -> int:
        time.sleep(seconds)
        raise BadRowsError(f"could not compute the loss of row {item}")


def test_scheduler_keeps_at_most_max_inflight_shards_per_worker(ray_session):
    pool = ActorPool(lambda i: _Probe.remote(), 2)
    done: list[int] = []
    try:
        pool.wait_ready(2)
        run_items(pool, range(40), lambda a, i: a.work.remote(i), done_items(done), max_inflight=3)
        peaks = ray.get([a.peak_calls.remote() for a in pool.actors])
    finally:
        pool.shutdown()
    assert sorted(done) == list(range(40))  # every item exactly once
    assert max(peaks) == 3  # the bound is reached and never exceeded


def test_the_last_shards_wait_for_a_starting_worker_rather_than_queue_on_a_busy_one(ray_session):
    # Two shards, one worker ready and one still starting: the ready worker takes one and
    # leaves the other for the starting worker instead of queueing it behind its own.
    actors = [_Probe.remote(1.0 * i) for i in range(2)]
    ray.get([a.work_where.remote(0) for a in actors])  # both processes up: only start waits
    pool = ActorPool(lambda i: None, 2, spares=actors)
    ran_on: dict[int, int] = {}
    try:
        pool.wait_ready(1)
        assert len(pool.starting) == 1
        run_items(pool, [0, 1], lambda a, i: a.work_where.remote(2.5), ran_on.update)
    finally:
        pool.shutdown()
    assert sorted(ran_on) == [0, 1] and ran_on[0] != ran_on[1]


def test_shared_items_go_once_each_to_the_workers_or_the_other_taker_and_none_waits_at_the_end(
    ray_session,
):
    # A queue that a thread of this process takes from too (as a member driver takes its
    # shards): every item is taken once, by one side; a worker holds a second item only
    # while more wait than there are takers (itself and the thread), so the last ones are
    # not queued behind a busy worker.
    items, lock, local = list(range(30)), threading.Lock(), []
    second_at: list[int] = []  # items left when the worker got a second one

    def take():
        with lock:
            return items.pop(0) if items else None

    def left():
        with lock:
            return len(items)

    def taker():
        while (item := take()) is not None:
            local.append(item)
            time.sleep(0.1)  # as long as a worker's item

    pool = ActorPool(lambda i: _Probe.remote(), 1)
    done: list[int] = []
    inflight: set[int] = set()
    try:
        pool.wait_ready(1)
        thread = threading.Thread(target=taker)
        thread.start()

        def submit(actor, item):
            if inflight - set(done):
                second_at.append(left() + 1)
            inflight.add(item)
            return actor.work.remote(item, 0.1)

        run_items(pool, SharedItems(take, left), submit, done_items(done), max_inflight=2)
        thread.join()
        peaks = ray.get([a.peak_calls.remote() for a in pool.actors])
    finally:
        pool.shutdown()
    assert sorted(done + local) == list(range(30)) and not set(done) & set(local)
    assert done and local  # both sides computed
    assert peaks == [2] and second_at  # a second item while many waited
    # ...never while at most two waited (one more may go to the thread as it is taken)
    assert min(second_at) >= 2


def test_items_failing_after_the_first_are_not_logged_as_unhandled_errors(ray_session, monkeypatch):
    # Every shard fails (bad data): the first error fails the run; the others, already
    # failed or still running, must not reach the user as Ray's "Unhandled error" tracebacks.
    unhandled: list[Exception] = []
    monkeypatch.setattr(ray._private.worker, "_unhandled_error_handler", unhandled.append)
    pool = ActorPool(lambda i: _Probe.remote(), 2)
    delays = {0: 0.2, 1: 0.3, 2: 0.6, 3: 0.9}  # two in flight per worker
    try:
        pool.wait_ready(2)
        with pytest.raises(BadRowsError, match="row 0") as failed:
            run_items(pool, list(delays), lambda a, i: a.fail.remote(i, delays[i]), print)
        del failed  # the traceback held the scheduler's frame, and with it the refs
        gc.collect()
        time.sleep(1.5)  # the items still running have failed by now
        gc.collect()
    finally:
        pool.shutdown()
    assert unhandled == []


def done_items(sink: list[int]):
    return lambda batch: sink.extend(result for _, result in batch)


@ray.remote(num_cpus=0.1)
class _Broken:
    def __init__(self):
        raise ConfigError("data.train is broken: fix data.train._target_")

    def describe(self) -> dict:
        return {}


def test_pool_fails_fast_on_broken_or_unplaceable_workers(ray_session):
    broken = ActorPool(lambda i: _Broken.remote(), 1)
    # The node is named: on a cluster, the one whose environment needs the fix.
    said = r"worker 0 on node \S+ failed while starting: .*fix data.train._target_"
    with pytest.raises(WorkerStartError, match=said):
        broken.wait_ready(1)
    broken.shutdown()
    nowhere = ActorPool(
        lambda i: _Probe.options(resources={"absent": 1}).remote(), 1, placement_timeout_s=1
    )
    with pytest.raises(PlacementTimeoutError, match="no worker could be placed for 1 s"):
        nowhere.wait_ready(1)
    nowhere.shutdown()
