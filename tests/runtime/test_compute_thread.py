"""One compute thread per process (runtime/compute_thread.py): a worker's shard calls, run on
several threads at once as Ray runs them, and the driver's checks all compute on the one
thread, so the process holds one OpenMP team (a shard's lanes, each on one torch thread,
start none)."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from grass_dist import job as job_module
from grass_dist import pipeline
from grass_dist.gradients.computer import GradientComputer
from grass_dist.runtime import compute_thread
from grass_dist.runtime.cluster import lanes_for
from grass_dist.runtime.worker import GradientWorker, plan_shards
from tests.conftest import compose_cfg


def test_calls_run_on_one_thread_in_turn_and_raise_their_errors():
    with ThreadPoolExecutor(4) as callers:
        names = list(
            callers.map(
                lambda _: compute_thread.call(lambda: threading.current_thread().name), range(8)
            )
        )
    assert set(names) == {"grass-compute"}
    assert threading.current_thread().name != "grass-compute"
    # A call made from the compute thread runs there at once (no queue to wait in).
    inner = compute_thread.call(
        lambda: compute_thread.call(lambda: threading.current_thread().name)
    )
    assert inner == "grass-compute"

    class Refused(Exception):
        pass

    def fails():
        raise Refused("row 3")

    with pytest.raises(Refused, match="row 3"):
        compute_thread.call(fails)
    assert compute_thread.call(lambda a, b=0: a + b, 2, b=3) == 5  # still serving


def test_lanes_run_their_calls_at_once_and_raise_once_all_have_ended():
    together = threading.Barrier(3, timeout=30)  # passed only by three calls running at once
    names: list[str] = []

    def call():
        names.append(threading.current_thread().name)
        together.wait()

    compute_thread.in_lanes([call, call, call])
    assert len(set(names)) == 3 and names.count(threading.current_thread().name) == 1
    ended: list[bool] = []

    def slow():
        time.sleep(0.2)
        ended.append(True)

    def fails():
        raise ValueError("lane 1")

    with pytest.raises(ValueError, match="lane 1"):
        compute_thread.in_lanes([slow, fails])
    assert ended == [True]


def test_a_forked_child_starts_its_own_compute_thread():
    compute_thread.call(lambda: None)  # the parent's thread exists
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child has none of its parent's threads
        try:
            name = compute_thread.call(lambda: threading.current_thread().name)
            os.write(write, name.encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 100).decode() == "grass-compute"
    assert status == 0


def test_a_workers_concurrent_shard_calls_and_the_drivers_checks_compute_on_one_thread(
    tmp_path, monkeypatch
):
    threads: list[str] = []
    shards: list[str] = []
    compute = GradientComputer.phi_loaded
    check = GradientComputer.phi_batch
    build = job_module.build_model

    def phi_loaded(self, *args, **kwargs):
        shards.append(threading.current_thread().name)
        return compute(self, *args, **kwargs)

    def phi_batch(self, batch):
        threads.append(threading.current_thread().name)
        return check(self, batch)

    def build_model(cfg):
        threads.append(threading.current_thread().name)
        return build(cfg)

    monkeypatch.setattr(GradientComputer, "phi_loaded", phi_loaded)
    monkeypatch.setattr(GradientComputer, "phi_batch", phi_batch)
    monkeypatch.setattr(job_module, "build_model", build_model)
    cfg = compose_cfg(tmp_path)  # 90 rows: 3 equal shards of 30, batches of 16
    job = pipeline.prepare(cfg)  # the driver builds its model
    assert threads and set(threads) == {"grass-compute"}
    threads.clear()
    worker = GradientWorker(job.raw, job.model_hash, threads=torch.get_num_threads())
    plans = plan_shards(job.n_train, job.cfg.index.shard_size, {})
    with ThreadPoolExecutor(len(plans)) as calls:  # as Ray's threads call an actor
        results = list(calls.map(worker.index_shard, plans))
    assert [(r.record.start, r.record.end) for r in results] == [(0, 30), (30, 60), (60, 90)]
    assert len(shards) == 3 and len(threads) == 6  # 3 shards, 6 batches
    # A worker of several threads computes a shard's batches in lanes of one torch thread
    # each (test_lanes.py): the compute thread and the lane threads, none with a team.
    assert worker.computer.lanes == lanes_for(worker.job.cluster, worker.threads)
    assert set(shards) == {"grass-compute"}
    assert all(t == "grass-compute" or t.startswith("grass-lane") for t in threads)
