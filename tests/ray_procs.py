"""Real Ray node processes on this machine for cluster tests: `ray start --block` per node.

Every node runs in its own process group with its own ports and temp dir, and a fresh auth
token shared only by this cluster (never ~/.ray/auth_token), so several clusters (other test
runs included) can live on one machine. `stop()` ends exactly the processes it started.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
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


def ray_cli(*args: str) -> list[str]:
    """The `ray` command line of this interpreter (its venv), whatever the PATH says."""
    return [sys.executable, "-c", "from ray.scripts.scripts import main; main()", *args]


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


class LocalRayCluster:
    """A head and worker nodes started with `ray start`; use as a context manager."""

    def __init__(self, tmp: Path | None = None):
        # Unix socket paths must stay short: a short temp dir of our own.
        self.temp_dir = tempfile.mkdtemp(prefix="gdr-", dir="/tmp")
        self.log_dir = Path(tmp or self.temp_dir)
        self.port = free_port()
        self.dashboard_port = free_port()
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            # Workers and job drivers resolve `python` to this venv's interpreter.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
            # A busy 2-core machine can take longer than Ray's default 30 s to register a node.
            "RAY_raylet_start_wait_time_s": "120",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> None:
        common = [
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            "--object-store-memory=100000000",
        ]
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 -- lives with the node
        proc = subprocess.Popen(
            ray_cli("start", *common, *args),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends all of it
        )
        self.nodes.append(proc)

    def start_head(self) -> None:
        self._start(
            "head",
            [
                "--head",
                "--num-cpus=0",
                f"--port={self.port}",
                f"--dashboard-port={self.dashboard_port}",
                "--dashboard-host=127.0.0.1",
                f"--ray-client-server-port={free_port()}",
                "--include-dashboard=true",
            ],
        )

    def add_worker(self, num_cpus: int = 2, num_gpus: int = 0) -> None:
        self._start(
            f"worker{len(self.nodes)}",
            [f"--address={self.address}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}"],
        )

    def wait_for(self, nodes: int, timeout: float = 120) -> None:
        """Block until `ray status` lists `nodes` active nodes."""
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            for proc in self.nodes:
                if proc.poll() is not None:
                    raise RuntimeError(f"a ray node exited early; logs in {self.log_dir}")
            res = subprocess.run(
                ray_cli("status", f"--address={self.address}"),
                env=self.env,
                capture_output=True,
                text=True,
            )
            out = res.stdout + res.stderr
            active = out.partition("Active:")[2].partition("Pending:")[0]
            if res.returncode == 0 and active.count(" node_") == nodes:
                return
            time.sleep(1)
        raise TimeoutError(f"the cluster never had {nodes} nodes: {out[-2000:]}")

    def submit(
        self, *entrypoint: str, timeout: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir <repo> -- <entrypoint>` and wait for it to finish.

        ``env`` replaces the cluster's environment (its auth token included) for this call.
        """
        return subprocess.run(
            ray_cli(
                "job",
                "submit",
                f"--address={self.dashboard}",
                f"--working-dir={ROOT}",
                "--",
                *entrypoint,
            ),
            env=self.env if env is None else env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self, grace: float = 10) -> None:
        """SIGTERM each node's process group (workers first), SIGKILL what outlives `grace`."""
        for proc in reversed(self.nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in reversed(self.nodes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group (raylet children)
            proc.wait()
        self.nodes.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


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
