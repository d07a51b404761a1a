"""Faults on a multi-node Ray cluster (ray.cluster_utils.Cluster, all on this machine).

One cluster per module: a head without CPUs and a permanent node `A` with two worker slots
(the custom resource `slot`; workers ask for one each via cluster.worker_resources). Tests
add and remove their own nodes. Every faulty run must end with an index bit-identical to
the clean run's, every training row exactly once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from grass_dist import pipeline
from grass_dist.index import GradientIndex, Store
from grass_dist.runtime.progress import read_progress
from grass_dist.scoring import results
from tests.conftest import SMALL, compose_cfg
from tests.ray_procs import ROOT, isolated_ray_env

pytestmark = pytest.mark.integration

N_TRAIN = 90
SHARDS = 15  # shard_size 6
BASE = [
    "index.shard_size=6",
    "index.batch_size=2",
    "cluster.num_workers=2",
    "cluster.worker_resources={slot:1}",
    "cluster.scale_check_s=0.5",
    "cluster.progress_interval_s=0.2",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with isolated_ray_env():
        c = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": False,
                # A killed node is declared dead within about a second.
                "_system_config": {
                    "health_check_initial_delay_ms": 0,
                    "health_check_period_ms": 300,
                    "health_check_failure_threshold": 3,
                },
            },
        )
        try:
            c.add_node(num_cpus=3, resources={"slot": 2})
            ray.init(address=c.address, configure_logging=False)
            c.out = tmp_path_factory.mktemp("cluster")  # shared model cache
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


def _cfg(cluster, name: str, *overrides: str):
    return compose_cfg(cluster.out, f"store.url={cluster.out / name}", *BASE, *overrides)


def _run_index(cfg) -> tuple[pipeline.Job, dict]:
    job = pipeline.prepare(cfg)
    try:
        return job, pipeline.run_index(job)
    finally:
        pipeline.shutdown(job)


def _arrays(url) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    parts = [data for _, data in GradientIndex.open(str(url)).iter_committed()]
    rows = np.concatenate([d.row_ids for d in parts])
    return rows, {n: np.concatenate([d.phi[n] for d in parts]) for n in parts[0].phi}


@pytest.fixture(scope="module")
def clean(cluster):
    job, stats = _run_index(_cfg(cluster, "clean"))
    assert stats["computed_shards"] == SHARDS
    return _arrays(job.cfg.index_url)


def _assert_same_index(url, clean) -> None:
    rows, phi = _arrays(url)
    assert rows.tolist() == list(range(N_TRAIN))  # every row exactly once, in order
    for layer, want in clean[1].items():
        assert np.array_equal(phi[layer], want), layer  # bit-identical to the clean run


def _index_while(job: pipeline.Job, condition, action, timeout: float = 180) -> dict:
    """Run the index stage on a thread; on the main thread (Cluster wants it), call
    `action()` once `condition()` holds mid-job. Returns the stage's stats."""
    out: dict = {}

    def drive() -> None:
        try:
            out["stats"] = pipeline.run_index(job)
        except BaseException as e:  # noqa: BLE001 -- re-raised on the main thread
            out["error"] = e

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    acted = False
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        if not acted and condition():
            action()
            acted = True
        time.sleep(0.05)
    thread.join(max(0.0, deadline - time.monotonic()))
    assert acted, "the job ended before the mid-job action could run"
    if "error" in out:
        raise out["error"]
    return out["stats"]


def _shards_on(job: pipeline.Job, node_id: str) -> int:
    index = job.progress.doc.get("index") or {}
    return dict(index.get("shards_by_node", {})).get(node_id, 0)


def test_killed_worker_mid_shard_loses_nothing(cluster, clean, caplog):
    caplog.set_level(logging.INFO, logger="grass_dist")
    job, stats = _run_index(_cfg(cluster, "killed", "faults.kill_worker_after_rows=3"))
    assert stats["computed_shards"] == SHARDS
    assert Store(job.cfg.index_url).exists("_faults/kill_worker")  # the fault did fire
    assert "retrying shard" in caplog.text and "died (" in caplog.text
    assert "replaces worker" in caplog.text
    _assert_same_index(job.cfg.index_url, clean)


def test_lost_node_loses_nothing(cluster, clean, caplog):
    caplog.set_level(logging.INFO, logger="grass_dist")
    node = cluster.add_node(num_cpus=1, resources={"slot": 2})
    job = pipeline.prepare(
        _cfg(cluster, "lost", "cluster.num_workers=4", "faults.shard_delay_s=0.5")
    )
    try:
        stats = _index_while(
            job,
            lambda: _shards_on(job, node.node_id) >= 1,
            lambda: cluster.remove_node(node, allow_graceful=False),
        )
    finally:
        pipeline.shutdown(job)
    assert stats["computed_shards"] == SHARDS
    assert "retrying shard" in caplog.text
    _assert_same_index(job.cfg.index_url, clean)


def test_node_added_mid_job_receives_shards(cluster, clean, caplog):
    caplog.set_level(logging.INFO, logger="grass_dist")
    job = pipeline.prepare(
        _cfg(
            cluster,
            "elastic",
            "cluster.max_workers=4",
            "cluster.max_inflight_per_worker=1",
            "faults.shard_delay_s=1.5",
        )
    )
    added = []
    try:
        _index_while(
            job,
            lambda: job._pool is not None,  # the job is running: its pool is starting
            lambda: added.append(cluster.add_node(num_cpus=1, resources={"slot": 2})),
        )
    finally:
        pipeline.shutdown(job)
        for node in added:
            cluster.remove_node(node)
    assert "growing 2 -> " in caplog.text
    assert _shards_on(job, added[0].node_id) >= 1, job.progress.doc["index"]
    _assert_same_index(job.cfg.index_url, clean)


@pytest.mark.skipif(torch.cuda.is_available(), reason="logical GPUs only on CPU-only machines")
def test_one_worker_per_logical_gpu_falls_back_to_cpu(cluster, clean, caplog):
    caplog.set_level(logging.INFO, logger="grass_dist")
    node = cluster.add_node(num_cpus=2, num_gpus=2, resources={"slot": 4})
    try:
        job = pipeline.prepare(_cfg(cluster, "gpu", "cluster.num_workers=3"))
        try:
            pipeline.run_index(job)
            pool = job._pool
            deadline = time.monotonic() + 60
            while len(pool.ready) < 2 and time.monotonic() < deadline:
                pool.tick()  # a slow second worker may start after the last shard
                time.sleep(0.1)
            ready = [m.info for m in pool.ready]
            waiting = len(pool.starting)
        finally:
            pipeline.shutdown(job)
    finally:
        cluster.remove_node(node)
    assert len(ready) == 2 and waiting == 1  # two GPUs: the third worker never lands
    assert sorted(i["gpu_ids"][0] for i in ready) == ["0", "1"]
    assert all(len(i["gpu_ids"]) == 1 and i["node_id"] == node.node_id for i in ready)
    assert all(i["device"] == "cpu" for i in ready)
    assert caplog.text.count("CUDA is unavailable") == 1  # said once per job
    _assert_same_index(job.cfg.index_url, clean)


def _summary(stdout: str) -> dict:
    return json.loads(stdout[("\n" + stdout).index("\n{\n") :])


@pytest.mark.parametrize("how", ["killed", "ctrl-c"])
def test_killed_driver_resumes_with_the_same_index(cluster, clean, tmp_path, how):
    # Ctrl-C ends the driver by killing the processes below it and exiting (`stop_now`), not
    # by Ray's shutdown: on a joined cluster its workers must still go with it, or the rerun
    # would wait for their slots.
    name = f"driver-{how}"
    cmd = [
        sys.executable,
        "-m",
        "jobs.index",
        f"run.output_dir={cluster.out}",
        *SMALL,
        f"store.url={cluster.out / name}",
        *BASE,
        f"cluster.address={cluster.address}",
        "faults.shard_delay_s=0.5",
    ]
    store = Store(str(cluster.out / name))
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 -- closed below
    first = subprocess.Popen(
        cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    seen = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            record = read_progress(store) if store.exists("_progress") else None
            if record and record.get("index") and record["index"]["shards_done"] >= 3:
                seen = record
                break
            time.sleep(0.1)
    finally:
        if how == "ctrl-c" and seen is not None:
            first.send_signal(signal.SIGINT)
            status = first.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):  # none left in its group
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        log.close()
    assert seen is not None, (tmp_path / "first.log").read_text()[-3000:]
    if how == "ctrl-c":
        assert status == 130, (tmp_path / "first.log").read_text()[-3000:]
    # Another process followed the running job through its progress record.
    assert seen["state"] == "running" and seen["stage"] == "index"
    assert 3 <= seen["index"]["shards_done"] < SHARDS and seen["index"]["rows_per_s"] > 0
    committed = len(GradientIndex.open(store.url).committed())
    assert 3 <= committed < SHARDS
    second = subprocess.run(cmd[:-1], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    stats = _summary(second.stdout)["index"]
    assert stats["skipped_shards"] == committed
    assert stats["computed_shards"] == SHARDS - committed
    assert f"skipping {committed} already committed" in second.stdout + second.stderr
    _assert_same_index(store.url, clean)


def _scores(job: pipeline.Job) -> dict:
    topk = results.load_table(job.index, job.cfg.run.name, "topk").to_pandas()
    self_inf = results.load_table(job.index, job.cfg.run.name, "self_influence").to_pandas()
    return {"topk": topk.sort_values(["query_row", "kind", "rank"]), "self": self_inf}


def test_killed_reducer_recovers_from_the_store(cluster, clean, caplog):
    caplog.set_level(logging.INFO, logger="grass_dist")
    src = cluster.out / "clean"
    dst = cluster.out / "reducer"
    shutil.copytree(src, dst)  # a finished index: the reducer stages run on it
    base = _cfg(cluster, "reducer")
    job = pipeline.prepare(base)
    try:
        query = pipeline.query_phi(job)
        pipeline.release_workers(job)
        pipeline.run_precondition(job)
        pipeline.run_score(job, query)
    finally:
        pipeline.shutdown(job)
    pre_bytes = job.index.get_artifact("preconditioner/fisher.safetensors")
    before = _scores(job)
    complete = results.manifest(job.index, job.cfg.run.name)

    for stage in ("precondition", "score"):
        caplog.clear()
        job = pipeline.prepare(_cfg(cluster, "reducer", f"faults.kill_reducer_during={stage}"))
        try:
            pipeline.run_precondition(job)
            if stage == "score":
                pipeline.run_score(job, query)  # the same query gradients as above
        finally:
            pipeline.shutdown(job)
        assert job.index.has_artifact(f"_faults/kill_reducer_{stage}")
        assert f"retrying stage {stage} on a new reducer" in caplog.text
        assert job.index.get_artifact("preconditioner/fisher.safetensors") == pre_bytes
    after = _scores(job)
    for key in before:
        assert before[key].reset_index(drop=True).equals(after[key].reset_index(drop=True))
    # Each scoring run writes its own folder; only the folder the current _COMPLETE.json
    # names is read, so the dead attempt's folder is never referenced.
    now = results.manifest(job.index, job.cfg.run.name)
    listed_files = [now["files"]["topk"], *now["files"]["self_influence"]]
    # topk.parquet lies in the run folder, self-influence parts one level below it
    run_dirs = {Path(now["files"]["topk"]).parent.name}
    run_dirs |= {Path(f).parent.parent.name for f in now["files"]["self_influence"]}
    assert len(run_dirs) == 1
    listed = set(Store(str(dst)).list(f"results/{job.cfg.run.name}"))
    assert run_dirs < listed and "_COMPLETE.json" in listed
    assert now["files"] != complete["files"]  # a new run replaced the first
    for rel in listed_files:
        assert job.index.has_artifact(rel)
