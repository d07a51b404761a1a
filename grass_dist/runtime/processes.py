"""The processes this one started, found and stopped through Linux's /proc: for a Ray whose
start is cut short, which neither `ray.init` nor Ray's shutdown can stop yet."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Collection
from contextlib import suppress


def stop_half_started(
    grace_s: float = 3.0, poll_s: float = 0.02, spare: Collection[int] = ()
) -> None:
    """Kill the processes of an embedded Ray whose start another thread of this process is
    still in, or was cut short in, or of one that a stopping job ends this way rather than
    by Ray's shutdown (`grass_dist.launch.stop_now`): neither that `ray.init` nor
    Ray's shutdown can stop a Ray that has not finished starting, and its raylet, in its
    own start, does not stop on SIGTERM. Every process below this one (Ray's GCS, raylet,
    monitors, and the raylet's agents, which would outlive a raylet that died) gets
    SIGKILL, until none is left or `grace_s` passed; but not the children in `spare`
    (those this process had before the start: `children()`) nor what runs below them.
    Each is stopped (SIGSTOP) before any is killed: an agent the raylet forks just as it is
    killed would otherwise pass to init, out of sight below this process, and run on."""
    deadline = time.monotonic() + grace_s
    killed: set[int] = set()
    while time.monotonic() < deadline:
        for pid in killed:  # reap those of them that are this process's children, only
            with suppress(ChildProcessError):  # (another's Popen would lose its status)
                os.waitpid(pid, os.WNOHANG)
        alive = _frozen_descendants(set(spare))
        if not alive:
            return
        for pid in alive:
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        killed |= set(alive)
        time.sleep(poll_s)


PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def adopt_orphans() -> bool:
    """Make this process the one that orphans below it pass to (Linux's child subreaper)
    rather than init, so that `stop_half_started` still finds them: an agent that Ray's
    raylet forked just after a signal to the whole process group (which it then never got)
    outlived the raylet, passed to init, and ran on. For a `jobs/` process, which ends with
    its job; whether it took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def children() -> set[int]:
    """This process's live children now (what `stop_half_started` is to spare)."""
    return {pid for pid in below(os.getpid(), depth=1) if running(pid)}


def _frozen_descendants(spare: set[int]) -> list[int]:
    """The live processes below this one, except those in `spare` and below them, each
    stopped (SIGSTOP), with those they forked before they stopped: a stopped process forks
    no more, and its children stay below it."""
    frozen: set[int] = set()
    while True:
        found = {pid for pid in below(os.getpid(), spare=spare) if running(pid)} - frozen
        if not found:
            return sorted(frozen)
        for pid in found:
            with suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= found


def below(root: int, spare: Collection[int] = (), depth: int | None = None) -> list[int]:
    """The processes below `root` in the process tree, at most `depth` levels down (Linux's
    /proc; none elsewhere), leaving out those in `spare` and everything below them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            parent = _parent(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    found, level, todo = [], 0, [root]
    while todo and (depth is None or level < depth):
        level_below = [pid for up in todo for pid in children.get(up, []) if pid not in spare]
        found += level_below
        todo, level = level_below, level + 1
    return found


def stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def _parent(pid: int) -> int | None:
    fields = stat(pid)
    return int(fields[1]) if fields else None


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie has)."""
    fields = stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")
