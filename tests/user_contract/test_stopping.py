"""Stopping a running job as users and schedulers do: Ctrl-C in its terminal, `kill`,
`ray job stop`, a scheduler's SIGTERM to the job alone or to its whole process group.

Whatever stops it, the job says what is kept, exits with the shell's status for the signal
(130 for SIGINT, 143 for SIGTERM) and no traceback or native stack, its progress record
says why it ended, its committed shards stay, nothing it started keeps running, and a rerun
goes on from where it stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from grass_dist.index import GradientIndex
from grass_dist.runtime.progress import read_progress
from tests.user_contract.conftest import run_job
from tests.user_contract.test_bad_input import _overrides


def _wait_for_a_commit(
    proc: subprocess.Popen, index: Path, timeout: float, said: Callable[[], str]
) -> None:
    """Until the job has committed a shard to `index`; `said()` is its output, shown if it
    ended first."""
    commits = index / "_manifests"
    deadline = time.monotonic() + timeout
    while not (commits.exists() and any(commits.iterdir())):
        assert proc.poll() is None, said()[-3000:]
        assert time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.1)


def _index_job(
    given: list[str], cwd: Path, env: dict[str, str], new_session: bool = True
) -> subprocess.Popen:
    """`python -m jobs.index given...` in `env` (the user's package's), in a session of its
    own (so that a signal can go to its whole process group, as a terminal's does). Its output
    goes to files (`_stderr`): a pipe that nobody reads while the job runs fills up (a job
    of many small shards logs each), and the job then waits in its logging for good."""
    with open(cwd / "job.stdout", "w") as out, open(cwd / "job.stderr", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.index", *given],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=new_session,
        )
    proc.stderr_file = cwd / "job.stderr"
    return proc


def _stderr(proc: subprocess.Popen) -> str:
    """What a job of `_index_job` wrote to its stderr so far."""
    return proc.stderr_file.read_text()


def _ended_by_ctrl_c(proc: subprocess.Popen, index: Path) -> int:
    """Checks a job of `_index_job` stopped by Ctrl-C: status 130, no traceback or native
    stack, the line saying what is kept, its progress record ended; returns how many shards
    it kept."""
    proc.wait(timeout=120)
    stderr = _stderr(proc)
    assert proc.returncode == 130, stderr[-3000:]
    for noise in ("Traceback", "terminate called", "logging.cc"):
        assert noise not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted: what the job committed")
    kept = GradientIndex.open(str(index))
    assert len(kept.committed()) >= 1
    record = read_progress(kept.store)  # ended, though the job ran on a thread of its own
    assert record["state"] == "failed", record
    assert record["error"] == "KeyboardInterrupt: interrupted (Ctrl-C)"
    return len(kept.committed())


def _all_gone(sid: int, within: float = 30) -> list[str]:
    """The processes of session `sid` still alive after up to `within` seconds."""
    deadline = time.monotonic() + within
    while _in_session(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    return _in_session(sid)


def _in_session(sid: int) -> list[str]:
    """Command lines of the live processes of session `sid` (a job started in a session of
    its own, with every process it starts)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[3]) == sid:  # state, session
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError, IndexError):
            continue  # not a process, or it just exited
    return found


# What stops it -> (signal, to the whole process group?, exit status, its last line's start,
# the progress record's error).
STOPS = {  # Ctrl-C in a terminal, to the group, is the test below with a user's package
    "kill_or_ray_job_stop": (
        signal.SIGTERM, False, 143, "stopped by SIGTERM", "Terminated: stopped (SIGTERM)"
    ),
    "sigterm_to_the_group": (
        signal.SIGTERM, True, 143, "stopped by SIGTERM", "Terminated: stopped (SIGTERM)"
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def lm_cache(tmp_path_factory) -> Path:
    """The language-model example's model cache, shared by this module's jobs (trained for
    two steps by the first)."""
    return tmp_path_factory.mktemp("lm_cache")


@pytest.mark.parametrize(("sig", "group", "status", "said", "record"), STOPS.values(), ids=STOPS)
def test_a_signal_while_the_driver_computes_ends_the_job_cleanly(
    tmp_path, lm_cache, sig, group, status, said, record
):
    # The language-model example: its driver computes shards of 100 documents, seconds each,
    # inside torch, on a thread of its own while Ray's processes and the workers start. The
    # signal comes as it computes its second. Exiting the interpreter with that thread inside
    # torch aborted the process (status 134 with a native stack), and SIGTERM, replaced by
    # Ray's handler, left the progress record "running".
    index = tmp_path / "index"
    given = [
        "+example=tiny_gpt2", "model.steps=2", "data.train.n_docs=400",
        f"model.cache_dir={lm_cache}", f"store.url={index}", f"run.output_dir={tmp_path}",
    ]  # fmt: skip
    err = tmp_path / "stderr.txt"
    with err.open("w") as stderr:
        command = [sys.executable, "-m", "jobs.index", *given]
        proc = subprocess.Popen(
            command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
        try:
            _wait_for_a_commit(proc, index, 300, err.read_text)
            time.sleep(1)
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            assert proc.wait(timeout=60) == status, err.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = err.read_text()
    for noise in ("Traceback", "terminate called", "logging.cc", "SIGTERM received"):
        assert noise not in text, text[-3000:]
    assert text.strip().splitlines()[-1].startswith(f"{said}: what the job committed"), text
    kept = GradientIndex.open(str(index))
    assert len(kept.committed()) >= 1
    assert read_progress(kept.store)["error"] == record
    assert _all_gone(proc.pid) == []  # Ray's processes and the workers are gone too


def test_ctrl_c_says_what_is_kept_and_a_rerun_goes_on(tmp_path, user_pkg):
    # Ctrl-C mid-index: no traceback, exit 130, and the rerun computes only what is missing.
    # A terminal sends SIGINT to its foreground process group: the job and Ray's processes.
    given = [*_overrides(user_pkg, tmp_path), "faults.shard_delay_s=2", "cluster.num_workers=1"]
    proc = _index_job(given, tmp_path, user_pkg.env())
    _wait_for_a_commit(proc, tmp_path / "index", 240, lambda: _stderr(proc))
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in its terminal sends
    kept = _ended_by_ctrl_c(proc, tmp_path / "index")
    assert _all_gone(proc.pid) == []
    rerun = run_job("index", *given[:-2], user=user_pkg, cwd=tmp_path, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["index"]["skipped_shards"] == kept


def test_ctrl_c_as_the_driver_commits_shard_after_shard_leaves_a_record_that_counts_them(
    tmp_path, user_pkg
):
    # The driver commits a two-row shard about every 50 ms (a task that sleeps 50 ms a batch;
    # on the bare model a few ms, and all 600 could be in before a slow Ray was up), also
    # once the index stage counts them. After a Ctrl-C it went on committing while Ray
    # stopped, and a shard was counted only when the stage's thread next looked: the ended
    # record said 79 shards where the index held 119.
    given = [
        *_overrides(user_pkg, tmp_path), "data.train.n=1200", "index.shard_size=2",
        "task=custom", "task._target_=my_pkg.tasks.Unhurried", "+task.delay_s=0.05",
    ]  # fmt: skip
    proc = _index_job(given, tmp_path, user_pkg.env())
    index = tmp_path / "index"
    _wait_for_a_commit(proc, index, 240, lambda: _stderr(proc))
    store = GradientIndex.open(str(index)).store
    while (read_progress(store) or {}).get("index") is None:  # the stage counts from here
        assert proc.poll() is None, _stderr(proc)[-3000:]
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    kept = _ended_by_ctrl_c(proc, index)
    assert kept < 600  # stopped while it indexed
    assert read_progress(store)["index"]["shards_done"] == kept


def _ray_starting(user_pkg, tmp_path) -> list[str]:
    """The user's job with two workers: it starts Ray as it starts (with one, the driver
    indexes alone and Ray starts only for a shard it gives back)."""
    return [*_overrides(user_pkg, tmp_path), "cluster.num_workers=2"]


_HOLD_RAY_START = """
import time
import grass_dist.runtime.embedded as embedded

def _held(cfg, *args, **kwargs):  # Ray's start, held: a Ctrl-C meanwhile lands in it
    time.sleep(120)

embedded.start = _held
"""


def test_ctrl_c_while_the_embedded_ray_starts_ends_the_job_as_any_ctrl_c(tmp_path, user_pkg):
    # The driver commits its first shards while Ray starts on the main thread; a Ctrl-C
    # there ended in a traceback (and an abort: the job's thread went on and started a Ray
    # while the interpreter shut down).
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOLD_RAY_START)
    env = user_pkg.env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(hook)])
    given = _ray_starting(user_pkg, tmp_path)
    proc = _index_job(given, tmp_path, env, new_session=False)
    _wait_for_a_commit(proc, tmp_path / "index", 120, lambda: _stderr(proc))
    proc.send_signal(signal.SIGINT)
    kept = _ended_by_ctrl_c(proc, tmp_path / "index")
    # Its record counts them, though no index stage began to (it said `index: null`).
    counted = read_progress(GradientIndex.open(str(tmp_path / "index")).store)["index"]
    assert counted["shards_done"] == kept and counted["rows_done"] > 0
    rerun = run_job("index", *given, user=user_pkg, cwd=tmp_path, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["index"]["skipped_shards"] == kept


_MARK_RAY_START = """
import os
import pathlib
import grass_dist.runtime.embedded as embedded

_real = embedded.start

def _marked(cfg, *args, **kwargs):  # Ray's real start, saying where it is
    marks = pathlib.Path(os.environ["RAY_START_MARKS"])
    (marks / "starting").touch()
    _real(cfg, *args, **kwargs)
    (marks / "started").touch()

embedded.start = _marked
"""


@pytest.mark.parametrize(
    ("sig", "status", "said"),
    [(signal.SIGTERM, 143, "stopped by SIGTERM"), (signal.SIGINT, 130, "interrupted")],
    ids=["sigterm", "sigint"],
)
def test_a_signal_while_the_embedded_ray_starts_ends_the_job_as_any_signal(
    tmp_path, user_pkg, sig, status, said
):
    # `ray.init` sets a SIGTERM handler of its own as it starts (sys.exit(15)), and its node
    # another: a SIGTERM then ended the job with status 15 and no word, and the processes
    # Ray had started so far (its dashboard and runtime-env agents) kept running. The Ray
    # really starts here (test_ctrl_c_while_the_embedded_ray_starts_... holds a fake one).
    hook, marks = tmp_path / "hook", tmp_path / "marks"
    hook.mkdir()
    marks.mkdir()
    (hook / "sitecustomize.py").write_text(_MARK_RAY_START)
    env = user_pkg.env(RAY_START_MARKS=str(marks))
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(hook)])
    given = _ray_starting(user_pkg, tmp_path)
    err = tmp_path / "stderr.txt"
    with err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.index", *given], cwd=tmp_path,
                                env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            # Ray is starting once its raylet runs, seconds before `ray.init` returns.
            while not any("raylet" in c for c in _in_session(proc.pid)):
                assert proc.poll() is None, err.read_text()[-3000:]
                assert time.monotonic() < deadline, "Ray's raylet never started"
                time.sleep(0.05)
            assert (marks / "starting").exists()
            proc.send_signal(sig)  # `kill`: the job's process alone
            assert proc.wait(timeout=60) == status, err.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = err.read_text()
    assert not (marks / "started").exists(), "the signal came after Ray's start: " + text
    for noise in ("Traceback", "terminate called", "logging.cc", "SIGTERM received"):
        assert noise not in text, text[-3000:]
    assert text.strip().splitlines()[-1].startswith(f"{said}: what the job committed")
    assert _all_gone(proc.pid) == []  # nothing Ray had started keeps running
    rerun = run_job("index", *given, user=user_pkg, cwd=tmp_path, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]


_API_CTRL_C_IN_RAY_START = """
import _thread, json, os, sys, threading, time
from pathlib import Path
import grass_dist as gd
from grass_dist.data import digits
from grass_dist.models.digits import digits_mlp

def below():  # live processes below this one, by command line
    found, todo = [], [os.getpid()]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            try:  # a thread or process that ended meanwhile has no files left
                for pid in (task / "children").read_text().split():
                    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                    if stat[0] not in "ZX":
                        found.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode())
                    todo.append(int(pid))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return found

def ctrl_c_once_the_raylet_runs():
    while not any("raylet" in c for c in below()):
        time.sleep(0.05)
    _thread.interrupt_main()  # what Ctrl-C does to a notebook's or a script's main thread

train = digits("train", n_train=120, n_query=8)
model = digits_mlp(hidden=[16], epochs=1, n_train=120, n_query=8)
threading.Thread(target=ctrl_c_once_the_raylet_runs, daemon=True).start()
try:
    gd.Index.build(model, train, store=sys.argv[1], k=16, workers=2)  # one worker: no Ray
    outcome = "built"
except KeyboardInterrupt:
    outcome = "interrupted"
time.sleep(2)  # what would be left is still there then
left = below()
index = gd.Index.build(model, train, store=sys.argv[1], k=16, workers=2)
rows = sum(r.rows for r in index.gradient_index.committed().values())
print(json.dumps({"outcome": outcome, "left": left, "rows": rows}))
"""


def test_ctrl_c_while_the_api_starts_ray_leaves_nothing_running(tmp_path):
    # A Python API call starts its embedded Ray on the caller's thread, under Ray's own
    # signal handling. Interrupted there, it left the Ray processes started so far running
    # (its GCS, raylet and agents), and the next call started another Ray beside them.
    script = tmp_path / "build.py"
    script.write_text(_API_CTRL_C_IN_RAY_START)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "index")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert said["outcome"] == "interrupted", said  # the Ctrl-C came while Ray started
    assert said["left"] == [], said
    assert said["rows"] == 120  # the call after it completed the index (the driver's shards
    # committed while Ray started are kept)
