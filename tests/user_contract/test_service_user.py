"""The query service as a user runs it: the batch job with precondition.damping=auto over
the user's own TensorDatasets, then `python -m jobs.serve` with the same config, queried
over HTTP with the standard library.

The service must serve the delta the batch job chose, so its answer for a query equals the
batch job's top-k for that query. (A service without a recorded choice refuses to start:
tests/service/test_service.py.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from grass_dist.index import GradientIndex
from grass_dist.scoring import results
from tests.user_contract.conftest import UserPackage, run_job

pytestmark = pytest.mark.integration

# The built-in digits MLP, small, over the user's TensorDatasets (see test_plain_datasets).
SMALL = [
    "model.hidden=[16]",
    "model.epochs=5",
    "model.n_train=120",
    "model.n_query=10",
    "model.data_seed=0",
    "compression.k=16",
    "index.shard_size=64",
    "cluster.num_workers=1",
    "data=custom",
    "data.train._target_=my_pkg.data.train_set",
    "+data.train.n=120",
    "data.query._target_=my_pkg.data.queries",
    "+data.query.n=10",
]
# Two deltas, neither the default 0.1: serving any other delta would change the scores.
AUTO = ["precondition.damping=auto", "precondition.grid=[0.001,10.0]"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_query() -> dict:
    """Query row 0 of the batch job, as a user would send it (nested lists, an int)."""
    from my_pkg.data import queries  # the user's package, on sys.path for this test

    x, y = queries(10)[0]
    return {"input": x.tolist(), "label": int(y)}


def call(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=60) as resp:
        return json.loads(resp.read())


def wait_until_serving(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"jobs.serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            call(f"{url}/healthz")
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(1)
    raise AssertionError(f"jobs.serve did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def start_service(
    user_pkg: UserPackage, tmp_path: Path, log_name: str, **popen: object
) -> tuple[subprocess.Popen, str, Path]:
    """`python -m jobs.serve` on the batch job's config: (process, URL, its log)."""
    port = free_port()
    log = tmp_path / log_name
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.serve", *SMALL, *AUTO, f"serve.port={port}"],
            cwd=tmp_path,
            env=user_pkg.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            **popen,
        )
    return proc, f"http://127.0.0.1:{port}", log


def test_serve_with_damping_auto_answers_like_the_batch_job(
    user_pkg: UserPackage, tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(user_pkg.root))
    batch = run_job("attribute", *SMALL, *AUTO, user=user_pkg, cwd=tmp_path)
    assert batch.returncode == 0, batch.stderr[-3000:]

    proc, url, log = start_service(user_pkg, tmp_path, "serve.log")
    try:
        wait_until_serving(proc, url, log, timeout=240)
        answer = call(f"{url}/query", {"examples": [first_query()], "topk": 5})
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does; the service shuts Serve down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    said = log.read_text()
    assert proc.returncode == 0, said[-3000:]  # Ctrl-C is how a user stops it: no error
    assert "Traceback" not in said and "graceful_shutdown failed" not in said
    assert "RAY_AUTH_MODE" in os.environ or "RAY_AUTH_MODE=disabled" not in said

    index = GradientIndex.open(str(tmp_path / "outputs" / "index"))
    chosen = results.manifest(index, "default")["summary"]["damping_selection"]["chosen"]
    assert chosen in (0.001, 10.0)
    table = results.load_table(index, "default", "topk").to_pandas()
    want = table[(table["query_row"] == 0) & (table["kind"] == "proponent")]
    want = want.sort_values("rank").head(5)
    got = answer["results"][0]["proponents"]
    assert answer["kind"] == "influence" and answer["train_rows"] == 120
    # One example alone may differ from the batch job's batched gradient in the last bits.
    assert [g["train_row"] for g in got] == want["train_row"].tolist()
    assert [g["train_key"] for g in got] == want["train_key"].tolist()
    np.testing.assert_allclose([g["score"] for g in got], want["score"], rtol=1e-4, atol=1e-6)

    # systemd (KillMode=control-group) and `kill -TERM -- -PGID` signal the whole process
    # group, the embedded Ray's processes with it: the service cannot delete its application
    # from a Ray that is going away, and must neither wait on it for good (it did, 60 s
    # until Ray's client gave up) nor abort with a native stack (Ray's signal handler).
    proc, url, log = start_service(user_pkg, tmp_path, "serve_group.log", start_new_session=True)
    try:
        wait_until_serving(proc, url, log, timeout=240)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    said = log.read_text()
    assert proc.returncode == 0, said[-3000:]
    assert "SIGTERM received" not in said and "Traceback" not in said
    assert "stopped together with this one" in said
