"""One thread per process for the model's compute.

torch's CPU kernels split their work across an OpenMP team (libgomp), and each thread that
starts parallel work gets a team of its own, whose threads stay alive, idle, for as long as
that thread lives. Once a process holds more team threads than it has CPUs, libgomp stops
letting idle team threads spin and puts them to sleep at once, so every kernel wakes its
team from sleep. Two teams are enough: a worker of `cluster.cpus_per_worker=2` on two CPUs
whose shard calls ran on two of Ray's threads by turns computed about 25 % slower than the
same worker with all its compute on one thread (bench/results/vs_bergson.md). So a worker
builds its replica and computes its shards, queries and map calls here, and the driver builds
its replica and computes its own shards here, all on the one thread this module keeps.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_calls: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple, dict]] = queue.SimpleQueue()
_thread: threading.Thread | None = None
_lanes: ThreadPoolExecutor | None = None
_lane_threads = 0


def _serve() -> None:
    while True:
        future, fn, args, kwargs = _calls.get()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # the caller raises it
                future.set_exception(e)
            del future, fn, args, kwargs  # hold no call's values while idle


def _forgotten() -> None:
    """In a forked child, which has none of its parent's threads: start afresh."""
    global _lock, _calls, _thread, _lanes, _lane_threads
    _lock, _calls, _thread = threading.Lock(), queue.SimpleQueue(), None
    _lanes, _lane_threads = None, 0


os.register_at_fork(after_in_child=_forgotten)


def call(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on this process's compute thread, waited for; inline when called
    there. What it raises is raised here. torch's thread-local settings (grad mode, autocast)
    are the compute thread's, not the caller's: fn sets what it needs. The thread is a daemon:
    a process exits without waiting for it."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_serve, name="grass-compute", daemon=True)
            _thread.start()
    if threading.current_thread() is _thread:
        return fn(*args, **kwargs)
    future: Future = Future()
    _calls.put((future, fn, args, kwargs))
    return future.result()


def in_lanes(calls: list[Callable[[], None]]) -> None:
    """Each of `calls` at once, returning once all have: the first on this thread, the
    others on the lane threads, kept for the process's life (a lane's torch state lasts from
    shard to shard). A call that raises has it raised here, after the others end."""
    global _lanes, _lane_threads
    with _lock:
        if _lanes is None or _lane_threads < len(calls) - 1:
            if _lanes is not None:
                _lanes.shutdown(wait=False)  # its idle threads exit
            _lane_threads = max(1, len(calls) - 1)
            _lanes = ThreadPoolExecutor(_lane_threads, thread_name_prefix="grass-lane")
        # Submitted under the lock: a caller wanting more lanes cannot shut this pool first.
        others = [_lanes.submit(c) for c in calls[1:]]
    try:
        if calls:
            calls[0]()
    finally:
        for f in others:
            f.exception()  # waits
    for f in others:
        f.result()
