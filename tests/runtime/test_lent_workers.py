"""The job's idle workers lent to the reducer's stages (runtime/executors.py).

When the index workers hold every CPU, the precondition and score stages run their map
calls on them instead of stopping them and starting Ray task processes in their place.
Either way the answers must be the same bits; a lent worker that dies sends the stage back
to Ray tasks, with the same answers again.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time

import numpy as np
import pytest
import ray

from grass_dist import pipeline, run
from grass_dist.config import JobConfig, resolve
from grass_dist.index import GradientIndex
from grass_dist.runtime import job_actors, local_shard
from grass_dist.runtime.executors import Executor, WorkersLostError
from grass_dist.runtime.placement import worker_factory
from grass_dist.runtime.pool import ActorPool
from grass_dist.runtime.reducer import ScoreRequest, preconditioner_path
from grass_dist.scoring import results
from tests.conftest import compose_cfg

pytestmark = pytest.mark.integration

# The session has 4 CPUs: two workers of 2 CPUs hold them all, two of 0.5 (SMALL) leave
# three idle. A pool that may grow (this one cannot: they hold every CPU) starts both: the
# driver is not one of them (`local_shard.member`).
EVERY_CPU = ("cluster.num_workers=2", "cluster.cpus_per_worker=2", "cluster.max_workers=3")
# A reducer process, whose stages the workers are lent to (these indexes are small enough
# for the driver to reduce itself, with no process and no lending).
OUT = (
    "scoring.dense=true",
    "scoring.self_influence=true",
    "precondition.damping=0.01",
    "cluster.driver_reduce_mib=0",
)


def _stored(url: str, name: str) -> dict:
    index = GradientIndex.open(url)
    return {
        "preconditioner": index.get_artifact(preconditioner_path("fisher")),
        "dense": results.load_dense(index, name),
        **{kind: results.load_table(index, name, kind) for kind in ("topk", "self_influence")},
    }


def test_workers_holding_every_cpu_run_the_stages_with_the_answers_of_ray_tasks(
    ray_session, tmp_path
):
    lent = run.attribute(compose_cfg(tmp_path, f"store.url={tmp_path / 'a'}", *OUT, *EVERY_CPU))
    tasks = run.attribute(compose_cfg(tmp_path, f"store.url={tmp_path / 'b'}", *OUT))
    # Both workers, or the one ready when the stage started (the other still starting).
    for stage in ("precondition", "score"):
        assert lent[stage]["ran_on"] in ("2 lent workers", "1 lent worker"), stage
    assert tasks["precondition"]["ran_on"] == tasks["score"]["ran_on"] == "ray tasks"
    a, b = _stored(str(tmp_path / "a"), "default"), _stored(str(tmp_path / "b"), "default")
    assert a["preconditioner"] == b["preconditioner"]
    np.testing.assert_array_equal(a["dense"], b["dense"])
    for kind in ("topk", "self_influence"):
        assert a[kind].equals(b[kind]), kind


def test_a_lent_worker_that_dies_sends_the_stage_back_to_ray_tasks(ray_session, tmp_path, caplog):
    job = pipeline.prepare(
        compose_cfg(tmp_path, f"store.url={tmp_path / 'i'}", *OUT, *EVERY_CPU), query=True
    )
    try:
        pipeline.run_index(job)
        job._pool.wait_ready(2)  # both lent, whatever the index took
        query = pipeline.query_phi(job)
        pipeline.run_precondition(job)
        req = ScoreRequest.of(job.cfg)
        clean = pipeline.on_workers(job, lambda w: job_actors.job_reducer(job).score(query, req, w))
        assert clean["ran_on"] == "2 lent workers"
        lent_to: list[list] = []

        def stage(workers: list):
            lent_to.append(list(workers))
            if workers:  # dies as the stage starts: its calls fail on the reducer
                ray.kill(workers[0], no_restart=True)
            return job_actors.job_reducer(job).score(query, ScoreRequest.of(job.cfg), workers)

        job.cfg.run.name = "after_loss"
        with caplog.at_level(logging.WARNING, logger="grass_dist"):
            again = pipeline.on_workers(job, stage)
        assert [len(w) for w in lent_to] == [2, 0]  # lent, then on tasks
        assert again["ran_on"] == "ray tasks" and job._pool is None  # the workers stopped
        assert "a worker lent to this stage died" in caplog.text
        a, b = _stored(job.cfg.index_url, "default"), _stored(job.cfg.index_url, "after_loss")
        np.testing.assert_array_equal(a["dense"], b["dense"])
        for kind in ("topk", "self_influence"):
            assert a[kind].equals(b[kind]), kind
    finally:
        pipeline.shutdown(job)


def test_only_a_lent_workers_death_is_workers_lost(ray_session, tmp_path):
    cfg = compose_cfg(tmp_path, f"store.url={tmp_path / 'e'}")
    worker = worker_factory(JobConfig.from_cfg(cfg).cluster, resolve(cfg))(0)
    ex = Executor([worker])
    assert ex.get(ex.submit(0, os.getpid)) == ray.get(worker.run.remote(os.getpid))
    with pytest.raises(WorkersLostError, match="lent to this stage died"):
        ex.get(ex.submit(0, os._exit, 3))
    with pytest.raises(ValueError, match="no"):  # the call's own error stays itself
        Executor([]).get(Executor([]).submit(0, int, "no"))
    with pytest.raises(ray.exceptions.WorkerCrashedError):  # a task's crash is not
        tasks = Executor([], max_retries=0)
        tasks.get(tasks.submit(0, os._exit, 3))


def test_queries_the_driver_computed_while_the_workers_start_and_stages_that_wait_for_them(
    ray_session, tmp_path, monkeypatch, caplog
):
    # The driver indexed every shard itself and its workers are still starting (their
    # readiness held back here): it differentiates the one-chunk query set too, to a
    # worker's bits, and the precondition stage waits for a starting worker rather than
    # stopping them all to start Ray task processes in their place; unless none is ready
    # within LEND_WAIT_S.
    monkeypatch.setattr(local_shard, "BUDGET_S", float("inf"))  # however loaded the machine
    caplog.set_level(logging.INFO, logger="grass_dist")
    ready = threading.Event()
    admit = ActorPool.admit
    monkeypatch.setattr(ActorPool, "admit", lambda pool: admit(pool) if ready.is_set() else None)
    for name, wait_s in (("lent", 60.0), ("tasks", 0.5)):
        ready.clear()
        monkeypatch.setattr(job_actors, "LEND_WAIT_S", wait_s)
        cfg = compose_cfg(tmp_path, f"store.url={tmp_path / name}", *OUT, *EVERY_CPU)
        job = pipeline.prepare_started(cfg, query=True)
        try:
            assert job._local is not None and len(job._local.result()) == 3
            assert pipeline.run_index(job, precondition_next=True)["driver_shards"] == 3
            mine = pipeline.query_phi(job)
            assert f"query gradients: {len(mine.row_ids)} rows, computed by the driver" in (
                caplog.text
            )
            caplog.clear()
            if name == "lent":
                threading.Timer(1.0, ready.set).start()  # a worker becomes ready meanwhile
            out = pipeline.run_precondition(job)
            if name == "lent":
                assert out["ran_on"] in ("1 lent worker", "2 lent workers")
                assert "first_worker" in job.startup_s
                ready.set()
                job._pool.wait_ready(1)
                theirs = pipeline.query_phi(job)  # the driver's replica is used once
                assert "computed by the driver" not in caplog.text
                np.testing.assert_array_equal(mine.row_ids, theirs.row_ids)
                for layer, phi in mine.phi.items():
                    np.testing.assert_array_equal(phi, theirs.phi[layer])  # bit for bit
            else:  # held past the wait: the workers stop and Ray tasks run the stage
                assert out["ran_on"] == "ray tasks" and job._pool is None
                assert "the stage runs on Ray tasks" in caplog.text
        finally:
            ready.set()
            pipeline.shutdown(job)
    saved = [
        GradientIndex.open(str(tmp_path / n)).get_artifact(preconditioner_path("fisher"))
        for n in ("lent", "tasks")
    ]
    assert saved[0] == saved[1]  # the same bits, wherever the map calls ran


def test_a_failed_stage_leaves_no_error_for_ray_to_print_later(ray_session, capfd, caplog):
    # Every call failed; the stage raises the first error. Ray prints an error nobody
    # collected ("Unhandled error") when its reference is dropped, in whatever output
    # comes next (a notebook's next call): the stage collects them all.
    ex = Executor([])
    refs = [ex.submit(i, int, f"no {i}") for i in range(3)]
    with pytest.raises(ValueError, match="no"):
        ex.get(refs)
    del refs
    gc.collect()
    time.sleep(2)
    assert "Unhandled error" not in capfd.readouterr().err + caplog.text
