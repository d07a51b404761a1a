"""Runtime policies without a cluster: elastic growth, phase overlap, faults, progress,
the shard plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta

import pytest
from botocore.exceptions import EndpointConnectionError, NoCredentialsError
from omegaconf import OmegaConf

from grass_dist.config import FaultsConfig, JobConfig
from grass_dist.errors import ConfigError
from grass_dist.index import ShardRecord, Store
from grass_dist.runtime import progress as progress_cli
from grass_dist.runtime import scaling
from grass_dist.runtime.overlap import Phases, overlap_seconds
from grass_dist.runtime.progress import JobProgress, read_progress, with_age
from grass_dist.runtime.reducer_handle import reduces_in_driver
from grass_dist.runtime.worker import ShardPlan, plan_shards, shard_id
from tests.conftest import compose_cfg

REQ = {"CPU": 0.5}


def test_grow_adds_what_fits_up_to_the_ceiling():
    d = scaling.grow(2, 8, {"CPU": 1.0, "memory": 1e9}, REQ)
    assert d.add == 2 and "growing 2 -> 4" in d.reason
    assert scaling.grow(2, 3, {"CPU": 4.0}, REQ).add == 1  # capped by max_workers


def test_grow_says_why_not():
    full = scaling.grow(4, 4, {"CPU": 8.0}, REQ)
    assert full.add == 0 and "cluster.max_workers=4" in full.reason
    busy = scaling.grow(2, 4, {"CPU": 0.25}, REQ)
    assert busy.add == 0 and "needs CPU=0.5, free CPU=0.25" in busy.reason


def test_grow_needs_every_requested_resource():
    request = {"CPU": 1.0, "GPU": 1.0}
    assert scaling.fits({"CPU": 8.0, "GPU": 2.0}, request) == 2
    assert scaling.fits({"CPU": 8.0}, request) == 0
    assert scaling.fits({"CPU": 0.3 + 0.2}, {"CPU": 0.5}) == 1  # float dust is not a shortfall


def test_phases_overlap_load_and_write_with_compute():
    """Shard 0's write and shard 1's load run while another shard computes.

    Deterministic: shard 0's write waits until shard 1 is computing, which can only happen
    if writes run outside the compute slot; a serial worker would time out here.
    """
    phases = Phases()
    s1_computing = threading.Event()
    s0_computed = threading.Event()
    errors: list[BaseException] = []

    def shard(i: int) -> None:
        try:
            with phases.run(f"s{i}", "load"):
                if i == 1:
                    assert s0_computed.wait(0) is False  # loaded before shard 0 finished
            with phases.run(f"s{i}", "compute"):
                if i == 0:
                    s0_computed.wait(0.2)  # give shard 1 time to load meanwhile
                    s0_computed.set()
                else:
                    s1_computing.set()
                    threading.Event().wait(0.2)
            with phases.run(f"s{i}", "write"):
                if i == 0:
                    assert s1_computing.wait(10), "write did not overlap the next compute"
        except BaseException as e:  # noqa: BLE001 -- re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=shard, args=(i,)) for i in (0, 1)]
    threads[0].start()
    threads[1].start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    spans = phases.spans()
    computes = sorted((s.start, s.end) for s in spans if s.phase == "compute")
    assert computes[0][1] <= computes[1][0]  # compute is exclusive
    assert overlap_seconds(spans, "write", "compute") > 0
    assert overlap_seconds(spans, "load", "compute") > 0
    assert set(phases.seconds("s0")) == {"load", "compute", "write"}


def test_fault_fires_once_per_index(tmp_path):
    script = (
        "import sys; from grass_dist.config import FaultsConfig; "
        "from grass_dist.index import Store; from grass_dist.runtime.faults import FaultInjector; "
        f"f = FaultInjector(FaultsConfig(kill_worker_after_rows=5), Store({str(tmp_path)!r})); "
        "f.after_rows(4, 0); print('alive at 4', flush=True); f.after_rows(4, 0); "
        "print('alive at 8', flush=True)"
    )
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert first.returncode == 1 and first.stdout == "alive at 4\n"
    assert "faults.kill_worker_after_rows=5" in first.stderr
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout == "alive at 4\nalive at 8\n"


def test_fault_config_is_validated(tmp_path):
    def job(*overrides: str) -> JobConfig:
        return JobConfig.from_cfg(
            OmegaConf.to_container(compose_cfg(tmp_path, *overrides), resolve=True)
        )

    with pytest.raises(ConfigError, match="faults.kill_reducer_during"):
        job("faults.kill_reducer_during=index")
    with pytest.raises(ConfigError, match="cluster.max_workers"):
        job("cluster.num_workers=3", "cluster.max_workers=2")
    assert job().faults == FaultsConfig()


def test_progress_record_counts_rows_rate_and_eta(tmp_path):
    store = Store(str(tmp_path))
    progress = JobProgress(store, "job-1", interval_s=0.0, bar=False)
    progress.begin("index")
    progress.index_plan(shards_total=4, skipped=1, rows_total=100, rows_todo=75)
    progress.shards_done(25, ["node-a"])
    progress.shards_done(25, ["node-b"])
    doc = read_progress(store, "job-1")
    ix = doc["index"]
    assert (doc["stage"], doc["state"]) == ("index", "running")
    assert (ix["shards_done"], ix["shards_total"], ix["rows_done"]) == (3, 4, 50)
    assert ix["shards_by_node"] == {"node-a": 1, "node-b": 1}
    assert ix["rows_per_s"] > 0
    assert ix["eta_s"] == pytest.approx(25 / ix["rows_per_s"], abs=0.02)
    progress.end("index", 1.5)
    assert read_progress(store)["stages"]["index"] == {
        "state": "done",
        "started": doc["stages"]["index"]["started"],
        "seconds": 1.5,
    }


def test_the_shard_bar_counts_to_the_end_though_a_stage_inside_the_index_ends_first(
    tmp_path, capsys
):
    # start_workers overlaps the index stage and ends first: the bar must still count.
    progress = JobProgress(Store(str(tmp_path)), "job-1", interval_s=0.0)
    progress.index_plan(shards_total=3, skipped=0, rows_total=30, rows_todo=30)
    progress.begin("start_workers")
    progress.begin("index")
    progress.end("start_workers", 0.5)
    for _ in range(3):
        progress.shards_done(10, ["node-a"])
    progress.end("index", 1.0)
    assert progress._bar is None and "3/3" in capsys.readouterr().err  # tqdm draws on stderr


def test_progress_record_is_readable_by_another_process(tmp_path):
    store = Store(str(tmp_path))
    JobProgress(store, "old", bar=False).write()
    progress = JobProgress(store, "new", bar=False)
    progress.begin("index")
    out = subprocess.run(
        [sys.executable, "-m", "grass_dist.runtime.progress", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["job_id"] == "new"


def test_the_progress_command_says_what_is_wrong_in_one_line(tmp_path):
    def progress(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "grass_dist.runtime.progress", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    assert progress("--help").returncode == 0
    typo = progress(str(tmp_path / "index_typo"))
    assert typo.returncode == 1 and "Traceback" not in typo.stderr
    assert typo.stderr.strip() == f"error: no gradient index at {tmp_path / 'index_typo'} " \
        "(index.json not found)"  # fmt: skip
    (tmp_path / "index.json").write_text("{}")
    none = progress(str(tmp_path), "--job", "nope")
    assert none.returncode == 1 and "no progress record of job nope under" in none.stderr
    bad = progress(str(tmp_path), "--option", "endpoint_url")
    assert bad.returncode == 2 and "--option takes KEY=VALUE" in bad.stderr


@pytest.mark.parametrize(
    ("options", "cause", "says", "fix"),
    [
        (
            [],
            EndpointConnectionError(endpoint_url="https://bucket.s3.amazonaws.com/"),
            "error: index store 's3://bucket/idx' at the default AWS S3 endpoint is "
            "unreachable: cannot list '_progress': EndpointConnectionError",
            "Fix: for an index on an S3-compatible server, set AWS_ENDPOINT_URL=http://HOST:PORT"
            " or pass --option endpoint_url=http://HOST:PORT",
        ),
        (
            ["--option", "endpoint_url=http://127.0.0.1:9"],
            EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
            "error: index store 's3://bucket/idx' at endpoint http://127.0.0.1:9 is unreachable",
            "Fix: check that http://127.0.0.1:9 is up and reachable from this machine",
        ),
        (
            [],
            NoCredentialsError(),
            "error: access denied by the index store 's3://bucket/idx' at the default AWS S3 "
            "endpoint (bucket 'bucket'): cannot list '_progress': NoCredentialsError",
            "Fix: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in this "
            "environment",
        ),
    ],
    ids=["no_endpoint", "endpoint_down", "no_credentials"],
)
def test_the_progress_command_gives_a_readers_fix_for_an_s3_store(
    monkeypatch, options, cause, says, fix
):
    # A read-only command: no store.* settings, nodes or reruns in its advice.
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)

    def unreachable(store, rel_dir):
        raise store._error(f"cannot list {rel_dir!r}", cause, 1.0)

    monkeypatch.setattr(Store, "list", unreachable)
    with pytest.raises(SystemExit) as info:
        progress_cli.main(["s3://bucket/idx", *options])
    message = str(info.value.code)
    assert message.startswith(says) and fix in message
    for jobs_only in ("at endpoint the", "rerun", "store.retries", "every node", "committed"):
        assert jobs_only not in message


def test_the_progress_command_piped_into_a_closed_reader_exits_quietly(tmp_path):
    # `... | head -1` closes the pipe early: no BrokenPipeError traceback, a shell's SIGPIPE
    # status. The read end is closed before the command writes, so this is no race.
    JobProgress(Store(str(tmp_path)), "job-1", bar=False).write()
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "grass_dist.runtime.progress", str(tmp_path)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write)
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (141, "")


def test_a_record_still_running_says_how_long_since_its_update(tmp_path):
    # A driver killed outright leaves "running" for good: the reader sees its age.
    store = Store(str(tmp_path))
    progress = JobProgress(store, "job-1", bar=False)
    progress.begin("index")
    doc = read_progress(store)
    later = datetime.fromisoformat(doc["updated"]) + timedelta(seconds=3600)
    assert with_age(doc, later)["seconds_since_update"] == 3600
    progress.finish()
    assert "seconds_since_update" not in with_age(read_progress(store), later)


def _records(spans):
    return {
        shard_id(lo, hi): ShardRecord(
            shard_id(lo, hi), lo, hi, hi - lo, f"{lo}.parquet", "", 0, "a"
        )
        for lo, hi in spans
    }


def test_shards_split_rows_evenly_and_a_resume_plans_what_was_left():
    spans = [(p.start, p.end) for p in plan_shards(200, 128, {})]
    assert spans == [(0, 100), (100, 200)]  # not 128 + 72: no worker waits on a short shard
    plans = plan_shards(1003, 128, {})
    sizes = [p.rows for p in plans]
    assert len(plans) == 8 and sizes == [126, 126, 126, 125, 125, 125, 125, 125]
    assert plans[0].start == 0 and plans[-1].end == 1003
    assert all(a.end == b.start for a, b in zip(plans, plans[1:], strict=False))
    for done in ([0, 2, 3], [7], [1, 6], list(range(7))):
        # A resume plans exactly the shards of the first plan it did not commit.
        committed = _records([(plans[i].start, plans[i].end) for i in done])
        left = [p for i, p in enumerate(plans) if i not in done]
        assert plan_shards(1003, 128, committed) == left
    # Rows added after shards of another size were committed: only the new rows, evenly.
    grown = plan_shards(300, 128, _records([(0, 128), (128, 200)]))
    assert [(p.start, p.end) for p in grown] == [(200, 300)]
    assert plan_shards(1, 128, {}) == [ShardPlan(shard_id(0, 1), 0, 1)]
    assert plan_shards(0, 128, {}) == []


def test_an_embedded_ray_that_does_not_start_is_tried_once_more_then_refused(monkeypatch):
    from grass_dist.config import ClusterConfig
    from grass_dist.errors import RayStartError
    from grass_dist.runtime import cluster, embedded

    calls = []

    def init(**kwargs):
        calls.append(kwargs["address"])
        if calls.count("local") <= fail_times:
            raise Exception("The current node timed out during startup.\nmore")  # as Ray does

    monkeypatch.setattr(cluster.ray, "init", init)
    monkeypatch.setattr(cluster.ray, "shutdown", lambda: calls.append("shutdown"))
    fail_times = 1
    embedded.start(ClusterConfig())
    assert calls == ["local", "shutdown", "local"]
    calls.clear()
    fail_times = 2
    with pytest.raises(RayStartError, match=r"did not start, 2 times \(The current node timed "):
        embedded.start(ClusterConfig())
    assert calls == ["local", "shutdown", "local", "shutdown"]


_NICENESS = """
import os, ray
from grass_dist.config import ClusterConfig
from grass_dist.runtime import embedded
embedded.start(ClusterConfig(num_cpus=1))
print(os.nice(0), ray.get(ray.remote(lambda: os.nice(0)).remote()))
"""


@pytest.mark.integration
def test_an_embedded_rays_workers_compute_at_the_drivers_priority():
    # Ray starts its workers at nice 15: beside a driver that computes shards as one of the
    # workers (local_shard.member) they got less CPU than it, and finished last.
    said = subprocess.run(
        [sys.executable, "-c", _NICENESS], capture_output=True, text=True, timeout=120
    )
    assert said.returncode == 0, said.stderr[-2000:]
    driver, worker = said.stdout.split()
    assert worker == driver


def test_the_driver_reduces_an_index_up_to_driver_reduce_mib_and_never_one_a_fault_kills(tmp_path):
    def cfg(*overrides: str) -> JobConfig:
        return JobConfig.from_cfg(
            OmegaConf.to_container(compose_cfg(tmp_path, *overrides), resolve=True)
        )

    # 1000 rows x 3 layers of k=256: 3 MiB of float32 rows and 1.5 MiB of k x k float64.
    layers = {"fc1": 256, "fc2": 256, "out": 256}
    need = 4 * 1000 * 768 + 8 * 3 * 256 * 256
    assert reduces_in_driver(cfg(), layers, 1000)
    assert reduces_in_driver(cfg(f"cluster.driver_reduce_mib={need / 2**20}"), layers, 1000)
    assert not reduces_in_driver(cfg(f"cluster.driver_reduce_mib={need / 2**20}"), layers, 1001)
    assert not reduces_in_driver(cfg("cluster.driver_reduce_mib=0"), layers, 1)
    # k = 4096 on two layers: 256 MiB of matrices, whatever the rows.
    assert not reduces_in_driver(cfg(), {"a": 4096, "b": 4096}, 10)
    # A fault that kills the reducer would kill the driver.
    assert not reduces_in_driver(cfg("faults.kill_reducer_during=score"), layers, 10)
