"""README's "On this machine with `ray start`", run as written, one shell per terminal.

The commands come from README's fenced blocks of that section, so the documentation cannot
drift from what runs. What the test changes, and why:

- the documented ports (6379, 8265, 10001) become free ones, and `$PWD/outputs` a temp
  folder, so the test never meets another Ray or writes into the checkout;
- small-size overrides (and `scoring.dense=true`, for README's dense snippet) are appended
  to the job's command line, so the job takes seconds;
- the shells get their own `RAY_AUTH_TOKEN` (README's alternative to `~/.ray/auth_token`)
  and `RAY_TMPDIR`, and a `PATH` without the virtual environment: README's activation line
  is what must put it there, for the job's `python` too;
- README's `ray job submit` line runs twice more, from a shell without the token and from
  one with another token, with an entrypoint that would leave a file: README says both are
  refused and run nothing.

The index the job wrote is then read in this process: every training row once, each the
gradient this process computes for it.

Ctrl-C in a node's terminal is SIGINT to that terminal's process group; the test sends it
to each node's group and checks that nothing of the group outlives it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from grass_dist import pipeline
from grass_dist.build import build_dataset, build_layer_compressors, build_model, build_task
from grass_dist.gradients.computer import GradientComputer
from grass_dist.index import GradientIndex
from tests.conftest import SMALL, compose_cfg
from tests.ray_procs import free_port, stop_groups, wait_for_output

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECTION = "### On this machine with `ray start`"
PORTS = ("6379", "8265", "10001")
STARTED = "Ray runtime started"  # what README says to wait for in a node's terminal
# A user retries this (README says so); the head's job agent can start after its GCS answers.
NOT_READY = "No available agent to submit job"


def section_blocks(text: str, heading: str) -> list[str]:
    """The ```bash blocks of one README section, continuation lines joined."""
    body = text.partition(heading)[2]
    assert body, f"README has no section {heading!r}"
    body = re.split(r"^#{2,3} ", body, flags=re.M)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```", body, flags=re.M | re.S)
    return [re.sub(r"\\\n\s*", "", b) for b in blocks]


def adapt(block: str, ports: dict[str, int], outputs: Path) -> str:
    """The block with free ports and the temp output folder (see the module docstring)."""
    for documented, port in ports.items():
        block = re.sub(rf"(?<![0-9]){documented}(?![0-9])", str(port), block)
    block = block.replace("$PWD/outputs", str(outputs))
    small = " ".join(f"'{o}'" for o in [*SMALL, "scoring.dense=true"])
    return re.sub(r"^(.*python -m jobs\.attribute .*)$", rf"\1 {small}", block, flags=re.M)


def user_env(tmp: str) -> dict[str, str]:
    """A shell before README's activation line: no venv on PATH, its own Ray token and tmp."""
    venv_bin = str(ROOT / ".venv" / "bin")
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RAY_ADDRESS")}
    env.update(
        PATH=os.pathsep.join(path),
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_TMPDIR=tmp,
        RAY_USAGE_STATS_ENABLED="0",
        # A busy 2-core machine can take longer than Ray's default 30 s to register a node.
        RAY_raylet_start_wait_time_s="120",
    )
    return env


def test_readme_ray_start_flow(tmp_path):
    if not (ROOT / ".venv" / "bin" / "activate").exists():
        pytest.skip("README's flow activates .venv; run `make` first")
    head_block, worker_block, submit_block = section_blocks(README.read_text(), SECTION)
    assert "ray start --head" in head_block and "--block" in head_block
    assert "ray start --address" in worker_block and "--block" in worker_block
    assert "ray job submit" in submit_block and "--working-dir ." in submit_block

    ports = {p: free_port() for p in PORTS}
    outputs = tmp_path / "outputs"
    ray_tmp = tempfile.mkdtemp(prefix="gdu-", dir="/tmp")  # Unix socket paths must stay short
    env = user_env(ray_tmp)
    nodes: list[subprocess.Popen] = []

    def terminal(name: str, block: str) -> None:
        """A node's terminal: its block in its own process group, until README's cue."""
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["bash", "-ec", adapt(block, ports, outputs)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's own process group, as Ctrl-C sees it
            )
        nodes.append(proc)
        wait_for_output(log, STARTED, proc)

    try:
        terminal("head", head_block)
        terminal("worker", worker_block)
        deadline = time.monotonic() + 120
        while True:
            done = subprocess.run(
                ["bash", "-ec", adapt(submit_block, ports, outputs)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if NOT_READY not in done.stdout + done.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        refusals = submit_without_the_token(adapt(submit_block, ports, outputs), env, tmp_path)
    finally:
        # Ctrl-C in terminal 2, then in terminal 1.
        outlived = stop_groups(list(reversed(nodes)), grace=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    # `ray status` answered (its view of a just-joined worker can lag a few seconds); the
    # job itself shows the worker joined: the head has no CPUs for the job's actors.
    assert "Active:" in done.stdout
    assert "succeeded" in done.stdout
    assert not outlived, f"Ctrl-C left Ray processes running: {outlived}"

    # The progress record README's last command prints: every stage done.
    progress = json.loads(done.stdout[done.stdout.rindex("\n{") :])
    assert progress["stages"]["score"]["state"] == "done"
    assert progress["index"]["shards_done"] == progress["index"]["shards_total"] == 3
    assert (outputs / "report-default.html").is_file()
    run_results_snippets(tmp_path)

    for (code, stderr), why in zip(refusals, ("Missing", "Invalid"), strict=True):
        assert code != 0 and f"{why} authentication token" in stderr, stderr[-2000:]
    assert not (tmp_path / "ran").exists(), "a job submitted without the token ran"
    assert_index_holds_this_process_gradients(outputs)


def submit_without_the_token(block: str, env: dict[str, str], tmp_path: Path) -> list:
    """README's `ray job submit` line with an entrypoint that would create `tmp_path/ran`,
    from a shell without the token (no RAY_AUTH_MODE either, and a HOME without
    ~/.ray/auth_token), and from one with another token; both at once.
    (returncode, stderr) of each."""
    submit = next(line for line in block.splitlines() if line.startswith("ray job submit"))
    submit = submit.partition(" -- ")[0] + f" -- python -c \"open('{tmp_path / 'ran'}', 'w')\""
    home = tmp_path / "home"
    home.mkdir()
    base = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    shells = [
        (". .venv/bin/activate", {**base, "HOME": str(home)}),
        (
            ". .venv/bin/activate; export RAY_AUTH_MODE=token",
            {**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)},
        ),
    ]
    procs = [
        subprocess.Popen(
            ["bash", "-ec", f"{setup}\n{submit}"],
            cwd=ROOT,
            env=shell_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for setup, shell_env in shells
    ]
    stderrs = [proc.communicate(timeout=120)[1] for proc in procs]
    return [(proc.returncode, stderr) for proc, stderr in zip(procs, stderrs, strict=True)]


def assert_index_holds_this_process_gradients(outputs: Path) -> None:
    """The cluster's index holds every training row once, each row the gradient this
    process computes for it with the job's config (read only: no Ray)."""
    job = pipeline.prepare(compose_cfg(outputs, "scoring.dense=true"))
    parts = [data for _, data in GradientIndex.open(job.cfg.index_url).iter_committed()]
    rows = np.concatenate([d.row_ids for d in parts])
    assert rows.tolist() == list(range(90))
    model = build_model(job.cfg)  # from the cache the job left in outputs/
    computer = GradientComputer(model, build_task(job.cfg), build_layer_compressors(job.cfg, model))
    want = computer.phi_rows(build_dataset(job.cfg, "train"), range(90), 16)
    for layer, got in want.phi.items():
        stored = np.concatenate([d.phi[layer] for d in parts])
        np.testing.assert_allclose(stored, got, rtol=1e-5, atol=1e-6)


def results_snippets() -> list[str]:
    text = README.read_text().partition("## Results: layout and schema")[2]
    text = re.split(r"^## ", text, flags=re.M)[0]
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def run_results_snippets(cwd: Path) -> None:
    """README's results snippets, as written, from the folder that holds `outputs/`."""
    snippets = results_snippets()
    assert len(snippets) == 2, "README's results section should show top-k and dense reads"
    topk, dense = (
        subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
        )
        for code in snippets
    )
    assert topk.returncode == 0, topk.stderr[-3000:]
    assert "proponent" in topk.stdout and "self_influence" in topk.stdout
    assert dense.returncode == 0, dense.stderr[-3000:]
    assert "(90, 12) float32" in dense.stdout
