"""Real Ray processes on this machine for tests: free ports, a private Ray environment
(its own auth token and temp dir, so other Ray users of the machine are never met), and
process groups stopped the way Ctrl-C stops a terminal, checked to leave nothing behind."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nothing listens on right now (and whose neighbours are not needed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def isolated_ray_env() -> Iterator[str]:
    """Ray settings of this process and its children, private to the caller.

    A fresh auth token (not ~/.ray/auth_token), and RAY_TMPDIR set to a new short directory
    (yielded), so that a `ray.cluster_utils.Cluster` keeps its sessions and its
    `ray_current_cluster` address file there, not in the /tmp/ray that other Ray users on
    this machine read. Ray caches its auth mode and token, so both are refreshed on the way
    in and out.
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    keys = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_TMPDIR")
    saved = {k: os.environ.get(k) for k in keys}
    tmp = tempfile.mkdtemp(prefix="gdc-", dir="/tmp")
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_TMPDIR=tmp)
    os.environ.pop("RAY_ADDRESS", None)
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        yield tmp
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
        shutil.rmtree(tmp, ignore_errors=True)


def running_in_groups(pgids: list[int]) -> list[str]:
    """Command lines of live (not zombie) processes in the process groups `pgids` (Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue  # not a process, or it just exited
        state, _ppid, pgrp = stat.rpartition(")")[2].split()[:3]
        if int(pgrp) in pgids and state != "Z":
            found.append(cmd)
    return found


def wait_for_output(log: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Block until the process `proc`, whose output goes to `log`, has printed `text`."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode}: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {text!r} after {timeout} s: {log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_groups(
    procs: list[subprocess.Popen], sig: int = signal.SIGINT, grace: float = 30
) -> list[str]:
    """Send `sig` to each process's group, in order (for SIGINT: Ctrl-C in its terminal).

    Each group gets `grace` seconds to end; SIGKILL then ends whatever is left of it, so a
    failing test leaves no Ray behind. Only these groups are touched: other Ray instances on
    the machine keep running. Returns the command lines that `sig` did not end in time.
    """
    outlived: list[str] = []
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while running_in_groups([proc.pid]) and time.monotonic() < deadline:
            time.sleep(0.2)
        outlived += running_in_groups([proc.pid])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return outlived
