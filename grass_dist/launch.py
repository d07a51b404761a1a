"""A `jobs/` process from its start to its exit: Ray first, the job meanwhile, a quick exit.

`python -m jobs.<name>` composes the config with Hydra and then needs two slow things: the
job's modules (torch, the model code: seconds) with the checks of its model, data and store,
and, for the jobs that compute, an embedded Ray (its processes: seconds more). `door` checks
the config, then starts Ray on this thread while the job imports and prepares on another, so
neither waits for the other; a malformed config never starts Ray, and a job refused by its
checks while Ray starts exits then, with the Ray processes started so far. `cli` stops Ray
as the job returns and skips the interpreter's final walk over every object (seconds, after
the summary is printed). Ctrl-C and SIGTERM end a job wherever it is (`stop_now`): its
progress record says why, Ray stops, and the process exits 130 or 143 at once.

This module imports no torch: only Hydra, OmegaConf, Ray and the config.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, NoReturn, TextIO

from omegaconf import DictConfig

from grass_dist import hydra_cli
from grass_dist.config import JobConfig, resolve
from grass_dist.errors import GrassError
from grass_dist.runtime import cluster, placement, processes
from grass_dist.target_checks import check_targets_set

# When this process started, set by `cli`: a `jobs/` entry point's times count from it.
_PROCESS_STARTED: float | None = None

# The process's own stdout, for what a `jobs/` process answers there (its JSON summary):
# `cli` points sys.stdout at stderr for everything else. Ray forwards its processes' output
# lines to sys.stdout ("(raylet) A worker died or was killed ...", a user's print() in a
# worker), which would otherwise come before the summary and break `| jq`.
_ANSWERS: TextIO | None = None


_ANSWERED = threading.Event()  # the job printed its answer: it is done, whatever comes


def answers() -> TextIO:
    """Where a `jobs/` process prints what it answers: its stdout, however `cli` set
    sys.stdout."""
    return _ANSWERS if _ANSWERS is not None else sys.stdout


def answer(text: str) -> None:
    """Print a job's answer, its JSON summary (`answers`): the job is done."""
    print(text, file=answers(), flush=True)
    _ANSWERED.set()


# What a door runs: `grass_dist.run.<door>(cfg)`.
_JOBS_MODULE = "grass_dist.run"


def process_start() -> float:
    """time.time() when this process started (from /proc on Linux; elsewhere: now)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()
    return time.time() - age


class Terminated(KeyboardInterrupt):
    """SIGTERM, as a `jobs/` process receives it (`kill`, `ray job stop`, a scheduler
    preempting it): it ends the job as Ctrl-C does, with status 143."""


def _terminated(signum: int, frame: Any) -> NoReturn:
    raise Terminated("stopped (SIGTERM)")


def exit_interrupted(e: KeyboardInterrupt) -> NoReturn:
    """Ctrl-C (or SIGTERM) ends a job: in a `jobs/` process, `stop_now`; elsewhere (a job
    door called from Python) SystemExit with the shell's status for the signal."""
    if _PROCESS_STARTED is not None:
        stop_now(e)
    _say_interrupted(e)
    sys.exit(_status(e))


def _status(e: KeyboardInterrupt) -> int:
    return 143 if isinstance(e, Terminated) else 130  # 128 + SIGTERM, 128 + SIGINT


def _say_interrupted(e: KeyboardInterrupt) -> None:
    what = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
    print(  # on a line of its own: a progress bar may hold the one before
        f"\n{what}: what the job committed to the index is kept; rerun the same command "
        "to go on: committed shards are not computed again",
        file=sys.stderr,
    )


def stop_now(e: KeyboardInterrupt) -> NoReturn:
    """End a `jobs/` process on Ctrl-C or SIGTERM, wherever its job is: the records of the
    jobs running here end, Ray stops, what is kept is said, and the process exits with the
    signal's status at once (0 when the job had printed its answer: the signal only cut
    its way out short). Ray stops by the kill of the processes below this one (its
    embedded Ray's, `processes.stop_half_started`) and this process's exit (a joined
    cluster's ends the driver's actors), not by `ray.shutdown`: a job thread's next Ray call
    after that (an actor it was creating) ended the process with status 1 and Ray's "The
    core worker has already been shutdown". Every commit is atomic and a rerun goes on
    from the committed shards, so a shard half written is only recomputed. The
    interpreter's own exit would wait for the job's threads, and a thread stopped inside
    torch then aborts the process with a native stack; and a job thread that saw its Ray
    stop must not start another (`cluster.STOPPING`, and Ray's own start on first use
    turned off)."""
    cluster.STOPPING.set()
    with suppress(ImportError):  # nor may Ray start one on a job thread's next Ray call
        importlib.import_module("ray._private.auto_init_hook").enable_auto_connect = False
    _end_progress(e)
    processes.stop_half_started()  # Ray's processes, and any orphans of theirs (adopted)
    if _ANSWERED.is_set():  # the signal only cut its way out short
        _exit_now(0)
    _say_interrupted(e)
    _exit_now(_status(e))


def _exit_now(status: int) -> NoReturn:
    for stream in (answers(), sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(status)


def job_start() -> float:
    """When the job started: its process's start for a `jobs/` entry point, else now."""
    return _PROCESS_STARTED if _PROCESS_STARTED is not None else time.time()


def cli(main: Callable[[], Any]) -> None:
    """Call a `hydra.main` entry point as `python -m jobs.<name>` does, with the jobs' logging.

    Hydra itself refuses a bad command line (an unknown key or preset, a malformed override)
    with status 1, the status of a crash; such a refusal exits 2 here like every other bad
    input, after the fix (`hydra_cli.say_the_fix`). Hydra exits from inside its handler, so
    the refusal is the exit's context. Hydra's printing flags (`hydra_cli.prints`) print on
    stdout.
    However the job ends, Ray stops now rather than in its exit hook, and the objects left
    are frozen: the process is about to end, so nothing needs collecting, and the
    interpreter's final collection over torch's and the job's objects took 1-2 s.
    sys.stdout is stderr while the job runs (`answers`). SIGTERM ends a job as Ctrl-C does
    (`Terminated`, `stop_now`).
    """
    from hydra.errors import CompactHydraException

    global _PROCESS_STARTED, _ANSWERS
    _PROCESS_STARTED = process_start()
    if not hydra_cli.prints(sys.argv[1:]):  # else Hydra prints on stdout, with its own log handler
        _ANSWERS, sys.stdout = sys.stdout, sys.stderr
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminated)
    processes.adopt_orphans()  # what Ray leaves when stopped stays in reach (`stop_now`)
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and isinstance(e.__context__, CompactHydraException):
            hydra_cli.say_the_fix(e.__context__)
            sys.exit(2)
        raise
    except KeyboardInterrupt as e:  # outside a job's stages: composing, importing
        stop_now(e)
    finally:
        # The job ended and said how: a signal now would only turn that into a traceback
        # (or a lost Ray into a wait), so the process ignores both as it stops Ray and exits.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        cluster.shutdown_unless_lost()
        gc.freeze()


def door(name: str, cfg: DictConfig) -> dict[str, Any]:
    """`grass_dist.run.<name>(cfg)` (attribute, index, score), with an embedded Ray started
    on this thread while the job's modules import and the job is prepared on another.

    Ray starts only for a config that passes its checks and names no cluster (a job joining
    one connects later, as `pipeline.prepare_started` explains); a config that fails them
    is refused first, as `run.<name>` would refuse it. The job runs on a daemon thread
    (Ray's processes die with the thread that started them, so this one starts Ray and waits
    there); its `connect` waits for this Ray. A Ray started here is stopped when the job
    ends, also when it raises or exits (a refusal exits 2), as `pipeline.prepare_started`
    stops one it started: each job of a sweep (`-m`) runs on a Ray of its own settings.
    An index job whose driver computes every shard itself starts Ray only if it asks.
    """
    job_cfg = _embedded_job(cfg, query=name != "index")
    if job_cfg is None:
        return _job(name, cfg)
    ray_start = cluster.OnRequest(job_cfg.cluster)
    if cluster.driver_alone(job_cfg) and not _cuda_devices():
        # Its driver computes every shard and query itself (on a machine without GPUs) and
        # reduces a small index: Ray would only take CPUs from it as it starts (its
        # processes: about 3 CPU-seconds), and the job needs one only for a shard the driver
        # gives back, a larger index or damping=auto. Ray starts if it asks.
        with cluster.on_request(ray_start):
            return _served(_Background(_job, name, cfg), ray_start)
    with cluster.CONNECTING:  # the job's own `connect` waits for this thread's Ray
        job = _Background(_job, name, cfg)
        try:
            with job.exiting_on_refusal():
                ray_start.started = cluster.connect(job_cfg.cluster)
        except KeyboardInterrupt as e:  # the lock is held until the process ends
            stop_now(e)
    return _served(job, ray_start)


def _served(job: _Background, ray_start: cluster.OnRequest) -> dict[str, Any]:
    """`job`'s result, this thread starting Ray meanwhile if the job asks for it
    (`cluster.OnRequest`). A Ray started here (`ray_start.started`) stops as the job ends,
    its workers with it: a sweep's next job starts a Ray of its own settings."""
    try:
        while not job.ended(0.05):
            ray_start.serve()
        return job.result()
    except KeyboardInterrupt as e:  # Ctrl-C and SIGTERM reach this thread, not the job's
        stop_now(e)
    finally:
        if ray_start.started:
            cluster.shutdown_unless_lost()


def _cuda_devices() -> bool:
    """Whether this machine shows NVIDIA devices (without importing torch): where it does,
    the driver computes no shard of its own (`local_shard.wanted`)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def _refusal(e: BaseException) -> bool:
    """Whether `e` is a job's refusal: `grass_dist.run` printed its reason and raised
    SystemExit(2)."""
    return isinstance(e, SystemExit) and e.code == 2


def _exit_refused() -> NoReturn:
    """End the process of a job refused while its Ray starts (status 2), with the processes
    of the Ray started so far."""
    cluster.STOPPING.set()
    processes.stop_half_started()
    _exit_now(2)


def _end_progress(e: KeyboardInterrupt) -> None:
    """End the progress record of every job running here: a job run on a thread of its
    own is not told, and would say "running" for good."""
    from grass_dist.runtime.progress import interrupt_running

    interrupt_running(e)


def _job(name: str, cfg: DictConfig) -> dict[str, Any]:
    return getattr(importlib.import_module(_JOBS_MODULE), name)(cfg)


def _embedded_job(cfg: DictConfig, query: bool) -> JobConfig | None:
    """`cfg`'s checked settings when it asks for an embedded Ray (cluster.address null),
    else None. A config that fails its checks is refused here (`refuse`), before the job's
    modules import torch: a mistyped value is refused in about a second, not three; so are
    a preset's unset values (the queries' only for a job that scores them) and workers that
    the embedded Ray could never place (`placement.check_placeable`)."""
    try:
        job = JobConfig.from_cfg(resolve(cfg))
        check_targets_set(job, query)
        placement.check_placeable(job.cluster)
    except GrassError as e:
        refuse(e)
    return job if job.cluster.address is None else None


def refuse(e: GrassError) -> NoReturn:
    """Print the error's one paragraph (no traceback) and exit with status 2."""
    # A worker's error arrives wrapped in Ray's RayTaskError, whose text is the remote
    # stack trace: print the cause's own message instead.
    cause = getattr(e, "cause", None)
    print(f"error: {cause if isinstance(cause, GrassError) else e}", file=sys.stderr)
    sys.exit(2)


class _Background:
    """`fn(*args)` on a daemon thread; `result()` waits for it and returns or raises what it
    did (SystemExit included: a refusal exits 2 from the job's thread through this one).
    A refusal while the main thread is in an `exiting_on_refusal()` block (Ray's start,
    which cannot be cut short: its waits are in Ray's native code) ends the process at
    once, with the Ray processes started so far: the refusal has said why, and nothing was
    written."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self._outcome: tuple[bool, Any] | None = None
        self._guard = threading.Lock()
        self._exits = False  # the main thread is in an exiting_on_refusal() block
        self._thread = threading.Thread(target=self._run, args=(fn, *args), name="job", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._outcome = (True, fn(*args))
        except BaseException as e:  # noqa: BLE001 -- handed to the waiting thread
            self._outcome = (False, e)
            with self._guard:
                if self._exits and _refusal(e):
                    _exit_refused()

    @contextmanager
    def exiting_on_refusal(self) -> Iterator[None]:
        """A block of the main thread that the job's refusal ends with the process, in a
        `jobs/` process (`cli`); elsewhere (a door called from Python) a plain block."""
        with self._guard:
            self._exits = _PROCESS_STARTED is not None
            if self._exits and self._outcome and _refusal(self._outcome[1]):
                _exit_refused()
        try:
            yield
        finally:
            with self._guard:
                self._exits = False

    def ended(self, timeout_s: float) -> bool:
        """Whether the job has ended, waiting up to `timeout_s` for it."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def result(self) -> Any:
        self._thread.join()
        ok, value = self._outcome
        if not ok:
            raise value
        return value
