"""The processes this one started, found and stopped through Linux's /proc: for a Ray whose
start is cut short, which neither `ray.init` nor Ray's shutdown can stop yet."""

from __future__ import annotations

import os
import signal
import time
from contextlib import suppress


def stop_half_started(grace_s: float = 3.0, poll_s: float = 0.02) -> None:
    """Kill the processes of an embedded Ray whose start another thread of this process is
    still in (or was cut short in): neither that `ray.init` nor Ray's shutdown can stop a
    Ray that has not finished starting, and its raylet, in its own start, does not stop on
    SIGTERM. Every process below this one (Ray's GCS, raylet, monitors, and the raylet's
    agents, which would outlive a raylet that died) gets SIGKILL, until none is left or
    `grace_s` passed. Each is stopped (SIGSTOP) before any is killed: an agent the raylet
    forks just as it is killed would otherwise pass to init, out of sight below this
    process, and run on. Such a Ray holds nothing yet: no job ran on it."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        with suppress(ChildProcessError):  # reap this process's children that died
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        alive = _frozen_descendants()
        if not alive:
            return
        for pid in alive:
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(poll_s)


def _frozen_descendants() -> list[int]:
    """The live processes below this one, each stopped (SIGSTOP), with those they forked
    before they stopped: a stopped process forks no more, and its children stay below it."""
    frozen: set[int] = set()
    while True:
        found = {pid for pid in _descendants(os.getpid()) if running(pid)} - frozen
        if not found:
            return sorted(frozen)
        for pid in found:
            with suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= found


def _descendants(root: int) -> list[int]:
    """The processes below `root` in the process tree (Linux's /proc; none elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            parent = _parent(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def _parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie has)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")
