"""Starting an embedded Ray: a start that fails is tried once more, then refused in words;
one cut short (Ctrl-C, SIGTERM) leaves none of its processes running and loses no signal;
a process's own SIGTERM handler stays in place; Ray's token notice is dropped."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import ray

from grass_dist.config import ClusterConfig
from grass_dist.errors import RayStartError
from grass_dist.runtime import processes

log = logging.getLogger(__name__)


# An embedded Ray's driver computes shards beside its workers on the same CPUs
# (`local_shard.member`). Ray starts its workers at nice 15, below the driver's 0: beside the
# driver a worker got 2 % less CPU time over an index stage (61.4 against 62.8 CPU-s in 65
# s), its shards took about 5 % longer, and it finished its last one 2-5 s after the driver
# (exploratory runs of bench_vs_bergson.py's 2 x 1 job: bench/results/vs_bergson.md).
SYSTEM_CONFIG = {"worker_niceness": 0}


def start(cfg: ClusterConfig, attempts: int = 2) -> None:
    """ray.init of a fresh local Ray (`_start_fresh`), without Ray's token notice."""
    notices = logging.getLogger(TOKEN_NOTICE_LOGGER)
    notices.addFilter(_drop_token_notice)
    try:
        _start_fresh(cfg, attempts)
    finally:
        notices.removeFilter(_drop_token_notice)


@contextmanager
def keeping_sigterm() -> Iterator[None]:
    """Ray's start, leaving a SIGTERM handler that this process set itself (the `jobs/`
    entry points' and the service's) in place, during the start too. `ray.init` on the main
    thread replaces it with one that exits with status 15 from wherever the main thread is
    (leaving the Ray processes started so far running), its node with another, and Ray's
    native failure-signal handler prints a stack for the signal (and, for an embedded Ray
    the same signal stops, sent to the whole process group, aborts the process seconds
    later): a process with a handler of its own gets none of them. One without (a Python
    API user's) keeps Ray's."""
    handler = signal.getsignal(signal.SIGTERM)
    own = callable(handler)  # SIG_DFL and SIG_IGN are not
    private = getattr(ray, "_private", None)
    constants = getattr(private, "ray_constants", None)
    if own and hasattr(constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"):
        constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # read as this process connects
    # ...and while it starts: `ray.init` and its node set theirs through this function.
    utils = getattr(private, "utils", None)
    setter = getattr(utils, "set_sigterm_handler", None) if own else None
    if setter is not None:
        utils.set_sigterm_handler = _keep_sigterm
    try:
        yield
    finally:
        if setter is not None:
            utils.set_sigterm_handler = setter
        if own and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


def _keep_sigterm(handler: Any) -> None:
    """Ray's `set_sigterm_handler` while `keeping_sigterm`: the process's own handler stays."""


def _start_fresh(cfg: ClusterConfig, attempts: int) -> None:
    """ray.init of a fresh local Ray; a start that fails (on a loaded machine its node can
    time out starting, a bare Exception) is tried once more, then refused in words. A
    start that fails or is cut short (Ctrl-C, SIGTERM: raised on) leaves no process of it
    running."""
    for attempt in range(1, attempts + 1):
        before = processes.children()
        try:
            with _signals_kept() as raise_lost:
                ray.init(
                    address="local",
                    num_cpus=cfg.num_cpus,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    configure_logging=True,
                    _system_config=SYSTEM_CONFIG,
                )
                raise_lost()
            return
        except BaseException as e:
            _stop_cut_short(before)
            if not isinstance(e, Exception):
                raise
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if attempt == attempts:
                raise RayStartError(
                    f"the embedded Ray did not start, {attempts} times ({why}). A loaded "
                    f"machine can time out Ray's start: rerun when it is quieter, or start "
                    f"Ray once yourself (`ray start --head`) and join it with cluster=ray"
                ) from None
            log.warning("the embedded Ray did not start (%s); starting it once more", why)


@contextmanager
def _signals_kept() -> Iterator[Callable[[], None]]:
    """Ray's start, with each exception that a Ctrl-C or SIGTERM handler raises meanwhile
    recorded; yields `raise_lost`, which raises the last one again. An exception raised
    where nothing can receive it is only printed ("Exception ignored in: <function
    _releaseLock ...> KeyboardInterrupt"), and Ray's start forks its processes from this
    thread, which runs Python's fork handlers (logging's): a Ctrl-C at that moment was
    lost, and the job ran on to its end and exited 0. One that reached the start ends it,
    so one recorded once it returned was lost. The main thread's handlers only (the others
    get no signals); those that are Python functions (not SIG_DFL or SIG_IGN)."""
    raised: list[tuple[int, Callable[..., Any]]] = []
    kept: dict[int, tuple[Callable[..., Any], Callable[..., Any]]] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if callable(handler):
                kept[sig] = (handler, _recording(handler, raised))
                signal.signal(sig, kept[sig][1])

    def raise_lost() -> None:
        if raised:
            signum, handler = raised[-1]
            handler(signum, None)

    try:
        yield raise_lost
    finally:
        for sig, (handler, recording) in kept.items():
            if signal.getsignal(sig) is recording:  # else Ray's start set one of its own
                signal.signal(sig, handler)


def _recording(
    handler: Callable[..., Any], raised: list[tuple[int, Callable[..., Any]]]
) -> Callable[..., Any]:
    def recording(signum: int, frame: Any) -> None:
        try:
            handler(signum, frame)
        except BaseException:
            raised.append((signum, handler))
            raise

    return recording


def _stop_cut_short(before: set[int]) -> None:
    """Stop what a `ray.init` that failed or was cut short started: the processes below this
    one but not below its children `before` the start (Ray's shutdown cannot stop a Ray
    that has not finished starting), then Ray's state in this process."""
    processes.stop_half_started(spare=before)
    with suppress(Exception):
        ray.shutdown()  # whatever part of it started


# Ray's notice, on every start of a Ray with RAY_AUTH_MODE unset, that it turned token
# authentication on, "Set RAY_AUTH_MODE=disabled to opt out": for an embedded Ray, which
# only this process uses, that is noise with advice against the user's interest.
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def _drop_token_notice(record: logging.LogRecord) -> bool:
    return "Token authentication is enabled" not in record.getMessage()
