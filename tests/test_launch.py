"""A job's start-up: the config is checked without torch, so Ray can start first; the job's
thread hands back what it raised; workers build their data while the driver prepares."""

import os
import re
import subprocess
import sys
import threading
import time

import pytest

from grass_dist import launch
from grass_dist.compress.registry import REGISTRY
from grass_dist.config import resolve
from grass_dist.config_checks import COMPRESSION_METHODS
from grass_dist.errors import RayStartError
from grass_dist.runtime import cluster, processes
from grass_dist.runtime.worker import GradientWorker
from tests.conftest import ROOT, compose_cfg


def test_the_config_check_knows_every_compression_method_and_whether_it_is_factorised():
    assert {m: cls.factorised for m, cls in REGISTRY.items()} == COMPRESSION_METHODS


def test_a_door_checks_its_config_and_reaches_ray_without_importing_torch():
    # What `door` runs before it starts Ray: nothing there may wait for torch to import.
    code = (
        "import sys, jobs.attribute\n"
        "from hydra import compose, initialize_config_dir\n"
        "from grass_dist import launch\n"
        "from grass_dist.config import register_configs\n"
        "register_configs()\n"
        f"with initialize_config_dir(config_dir={str(ROOT / 'conf')!r}, version_base='1.3'):\n"
        "    cfg = compose('config', overrides=['compression.method=logra'])\n"
        "assert launch._embedded_job(cfg, query=True) is not None\n"
        "print(sorted(m for m in ('torch', 'grass_dist.compress') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_a_door_refuses_a_bad_value_before_torch_imports():
    # A mistyped value is refused as soon as the config is checked: importing the job's
    # modules (torch among them) first took two seconds more.
    code = (
        "import sys, jobs.index\n"
        "from hydra import compose, initialize_config_dir\n"
        "from grass_dist import launch\n"
        "from grass_dist.config import register_configs\n"
        "register_configs()\n"
        f"with initialize_config_dir(config_dir={str(ROOT / 'conf')!r}, version_base='1.3'):\n"
        "    cfg = compose('config', overrides=['compression.k=0'])\n"
        "try:\n"
        "    launch.door('index', cfg)\n"
        "except SystemExit as e:\n"
        "    print(e.code, 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.stdout.strip() == "2 False", done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: compression.k=0 must be")


def test_a_bad_compression_method_is_refused_with_the_methods_there_are(tmp_path, capsys):
    cfg = compose_cfg(tmp_path, "compression.method=nope", small=False)
    with pytest.raises(SystemExit) as refused:
        launch._embedded_job(cfg, query=True)  # before Ray, as run.<door> would refuse it
    assert refused.value.code == 2
    said = r"^error: compression.method='nope' is unknown.*factgrass"
    assert re.search(said, capsys.readouterr().err)


def test_a_job_thread_hands_back_its_result_its_error_and_its_exit():
    assert launch._Background(lambda a, b: a + b, 2, 3).result() == 5
    with pytest.raises(ValueError, match="bad"):
        launch._Background(lambda: (_ for _ in ()).throw(ValueError("bad"))).result()
    with pytest.raises(SystemExit) as exited:
        launch._Background(sys.exit, 2).result()
    assert exited.value.code == 2


def test_connect_waits_for_the_thread_that_holds_rays_start(monkeypatch):
    # The door holds CONNECTING while it starts the job's thread and then Ray: the job's own
    # connect must wait for that Ray, not start one on its thread (whose end would kill it).
    started = []
    monkeypatch.setattr(cluster, "_start", lambda cfg: started.append(threading.current_thread()))
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: bool(started))
    answers = []
    job = threading.Thread(target=lambda: answers.append(cluster.connect(None)))
    with cluster.CONNECTING:
        job.start()
        job.join(0.3)
        assert job.is_alive()  # waiting for this thread's start
        assert cluster.connect(None) is True
    job.join(5)
    assert started == [threading.current_thread()]
    assert answers == [False]


def test_a_job_thread_asks_the_main_thread_to_start_ray_on_request(monkeypatch):
    # An index job its driver computes alone starts Ray only if it needs one: the job's
    # thread asks, and waits while the main thread (which outlives it) starts Ray.
    started = []
    monkeypatch.setattr(cluster, "_start", lambda cfg: started.append(threading.current_thread()))
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: bool(started))
    ray_start, answers = cluster.OnRequest(None), []
    with cluster.on_request(ray_start):
        job = threading.Thread(target=lambda: answers.extend(cluster.connect(None) for _ in "ab"))
        job.start()
        while job.is_alive():
            ray_start.serve()
            job.join(0.02)
        ray_start.serve()  # nothing more to start
    assert started == [threading.current_thread()] and ray_start.started
    assert answers == [True, True]
    assert cluster._ON_REQUEST is None  # a later job's connect starts its own


def test_a_ray_call_before_ray_started_on_request_asks_for_the_jobs_ray(monkeypatch):
    # Ray's own start on first use (`ray.put` and the like, before `ray.init`) would start
    # a Ray of its default settings on the job's thread: it asks for the job's instead. And
    # a job that will need Ray asks early without waiting (`request_soon`).
    import ray._private.auto_init_hook as hook

    started = []
    monkeypatch.setattr(
        cluster, "_start", lambda cfg: started.append((cfg, threading.current_thread()))
    )
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: bool(started))
    ray_own = hook.auto_init_ray
    ray_start = cluster.OnRequest("the job's cluster settings")
    with cluster.on_request(ray_start):
        job = threading.Thread(target=hook.auto_init_ray)  # what Ray's wrapped calls run
        job.start()
        while job.is_alive():
            ray_start.serve()
            job.join(0.02)
    assert started == [("the job's cluster settings", threading.current_thread())]
    assert hook.auto_init_ray is ray_own
    started.clear()
    ray_start = cluster.OnRequest("settings")
    with cluster.on_request(ray_start):
        cluster.request_soon()  # from the job's thread: nothing waits for it
        ray_start.serve()
    assert started == [("settings", threading.current_thread())] and ray_start.started


def test_a_ray_that_fails_to_start_on_request_fails_the_thread_that_asked(monkeypatch):
    def failed(cfg):
        raise RayStartError("the embedded Ray did not start, 2 times (test)")

    monkeypatch.setattr(cluster, "_start", failed)
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    ray_start, errors = cluster.OnRequest(None), []

    def ask() -> None:
        try:
            cluster.connect(None)
        except RayStartError as e:
            errors.append(str(e))

    with cluster.on_request(ray_start):
        job = threading.Thread(target=ask)
        job.start()
        while job.is_alive():
            ray_start.serve()  # the main thread goes on: the job says what failed
            job.join(0.02)
    assert errors == ["the embedded Ray did not start, 2 times (test)"]
    assert not ray_start.started


def test_a_worker_builds_the_datasets_it_is_given_as_it_is_created(tmp_path):
    raw = resolve(compose_cfg(tmp_path))
    worker = GradientWorker(raw, None, threads=1, datasets=("train", "query"))
    assert sorted(worker.datasets) == ["query", "train"]
    assert len(worker.datasets["train"]) == raw["data"]["train"]["n_train"]
    assert GradientWorker(raw, None, threads=1).datasets == {}


# A Ray whose start never ends, as a loaded machine's can take seconds in Ray's native
# code: it leaves a process with one of its own (a raylet and its agent), writes their pids.
_SLOW_RAY = """
import runpy, subprocess, sys, threading
from grass_dist.runtime import cluster, processes

def start(cfg):
    script = "echo $$ >> {pids}; sleep 300 & echo $! >> {pids}; exec sleep 301"
    subprocess.Popen(["bash", "-c", script])
    threading.Event().wait()

cluster._start = start
sys.argv = ["jobs.attribute", *sys.argv[1:]]
runpy.run_module("jobs.attribute", run_name="__main__")
"""


def test_a_job_refused_while_ray_starts_exits_then_with_the_processes_started(tmp_path):
    # The refusal is the job's answer: neither it nor the exit waits for Ray's start to end
    # (which, here, never does), and what that start left running stops with the process.
    pids = tmp_path / "pids"
    proc = subprocess.run(
        [sys.executable, "-c", _SLOW_RAY.format(pids=pids), "data.train.n_train=0"]
        + [f"run.output_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.rstrip().endswith("error: data.train.n_train=0 must be in [1, 1796]")
    left = [int(p) for p in pids.read_text().split()]
    assert len(left) == 2
    for _ in range(100):  # orphans, reaped by init once killed
        if not any(processes.running(pid) for pid in left):
            break
        time.sleep(0.1)
    assert not any(processes.running(pid) for pid in left)
    assert {p.name for p in tmp_path.iterdir()} <= {"pids", "logs"}  # no index written


@pytest.mark.parametrize("job", ["index", "attribute", "serve"])
def test_hydras_printing_flags_print_on_stdout_once(tmp_path, job):
    # `--cfg job > job.yaml`, `--help | less`, `--info`: what they print is the command's
    # output (a job's stdout is kept for its summary only while a job runs), each line once.
    import yaml

    def run(*flags):
        done = subprocess.run(
            [sys.executable, "-m", f"jobs.{job}", *flags], capture_output=True, text=True,
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    config = yaml.safe_load(run("--cfg", "job"))
    assert config["model"]["_target_"] and config["cluster"]["num_workers"] >= 1
    assert "== Configuration groups ==" in run("--help")
    info = run("--info", "searchpath").splitlines()
    (header,) = [line for line in info if "Config search path" in line]  # once, as printed
    assert header == "Config search path"
    assert not list(tmp_path.iterdir())  # and nothing ran (a job writes outputs/ here)


@pytest.mark.integration
def test_each_job_of_a_sweep_runs_on_an_embedded_ray_of_its_own_settings(tmp_path):
    # Hydra runs a sweep's jobs one after another in one process: the second one ran on the
    # first one's Ray, with its CPUs, whatever its own cluster.num_cpus said.
    done = subprocess.run(
        [sys.executable, "-m", "jobs.index", "-m", "cluster.num_cpus=1,2",
         "store.url=${run.output_dir}/index-${cluster.num_cpus}", f"run.output_dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    started = re.findall(r"started an embedded Ray with (\S+) CPUs", done.stderr)
    assert started == ["1.0", "2.0"], done.stderr[-3000:]
    assert {p.name for p in tmp_path.glob("index-*")} == {"index-1", "index-2"}


# A signal that comes as Ray's start forks a process: its exception is raised in the fork's
# handler (logging's, in Ray's start: "Exception ignored in: <function _releaseLock ...>"),
# where nothing can receive it, and only printed.
_SIGNAL_AS_RAY_FORKS = """
import os, runpy, signal, sys, time, traceback

sent = []

def after_fork():
    stack = [frame.filename for frame in traceback.extract_stack()]
    if not sent and any("ray/_private/services.py" in f for f in stack):
        sent.append(True)
        os.kill(os.getpid(), signal.{sig})
        time.sleep(5)  # the handler raises here

os.register_at_fork(after_in_parent=after_fork)
sys.argv = ["jobs.index", *sys.argv[1:]]
runpy.run_module("jobs.index", run_name="__main__")
"""


@pytest.mark.integration
@pytest.mark.parametrize(("sig", "status"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_as_ray_starts_a_process_still_ends_the_job(tmp_path, sig, status):
    # Ctrl-C as Ray's start forked a process: the KeyboardInterrupt was only printed, and
    # the job ran on to its end and exited 0.
    done = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AS_RAY_FORKS.format(sig=sig), "cluster.num_workers=2",
         "data.train.n_train=90", f"run.output_dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert "Exception ignored in" in done.stderr, done.stderr[-3000:]  # it was only printed
    assert done.returncode == status, done.stderr[-3000:]
    assert "rerun the same command to go on" in done.stderr
    assert not done.stdout  # no summary: the job did not run on


# Ctrl-C as the job's thread goes on from Ray's start (creating its workers, asking Ray
# for its resources) while the main thread stops the job.
_CTRL_C_AS_RAY_IS_UP = """
import os, runpy, signal, sys
from grass_dist import launch

real_served = launch._served

def served(job, ray_start):
    os.kill(os.getpid(), signal.SIGINT)
    return real_served(job, ray_start)

launch._served = served
sys.argv = ["jobs.index", *sys.argv[1:]]
runpy.run_module("jobs.index", run_name="__main__")
"""


@pytest.mark.integration
def test_ctrl_c_as_ray_is_up_exits_130(tmp_path):
    # The main thread stopped Ray with `ray.shutdown` while the job's thread went on: its
    # next Ray call ended the process with status 1 ("The core worker has already been
    # shutdown").
    done = subprocess.run(
        [sys.executable, "-c", _CTRL_C_AS_RAY_IS_UP, "cluster.num_workers=2",
         "data.train.n_train=90", f"run.output_dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 130, done.stderr[-3000:]
    assert done.stderr.rstrip().splitlines()[-1].startswith("interrupted: what the job")
    assert not done.stdout
