"""Bad input refused through the real CLI, `python -m jobs.<job>` as a user's shell runs it.

The same mains as test_bad_input.py's table, with RAY_TMPDIR on an empty folder: a refused
job exits 2 with one paragraph naming the fix, and leaves no Ray process running.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from grass_dist.index import GradientIndex
from tests.ray_procs import free_port
from tests.user_contract.conftest import run_job
from tests.user_contract.test_bad_input import _message, _overrides

CLI_CASES = {
    "run_name_parent": ("attribute", ("run.name=../x",), r"run\.name='\.\./x' must name a single"),
    "empty_train_set": ("index", ("data.train.n=0",), r"built an empty dataset"),
}


def _processes_naming(path: Path) -> list[str]:
    """Command lines of live processes that name `path` (Ray's name their session folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # not a process, or it just exited
        if str(path) in cmd:
            found.append(cmd)
    return found


@pytest.mark.parametrize(("job", "overrides", "match"), CLI_CASES.values(), ids=CLI_CASES.keys())
def test_cli_refuses_and_leaves_no_ray_running(tmp_path, user_pkg, job, overrides, match):
    # A job starts Ray while it checks the model, data and store (a malformed config never
    # starts it): a refused job stops that Ray before it exits, and writes nothing.
    # Ray puts every session it starts under RAY_TMPDIR: a short one, as its socket paths
    # must fit in 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="gd-ray-"))
    given = _overrides(user_pkg, tmp_path, *overrides)
    env = user_pkg.env(RAY_TMPDIR=str(ray_tmp))
    try:
        proc = run_job(job, *given, user=user_pkg, cwd=tmp_path, env=env, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(match, _message(proc.stderr), re.S)
    assert _processes_naming(ray_tmp) == []
    assert not (tmp_path / "index").exists()


def test_cli_refuses_workers_that_the_embedded_ray_could_never_place(tmp_path, user_pkg):
    # Such a worker never starts: the job waited cluster.placement_timeout_s (default ten
    # minutes) with Ray's autoscaler lines as the only sign of it.
    ray_tmp = Path(tempfile.mkdtemp(prefix="gd-ray-"))
    given = _overrides(
        user_pkg, tmp_path, "cluster.cpus_per_worker=64", "cluster.placement_timeout_s=30"
    )
    env = user_pkg.env(RAY_TMPDIR=str(ray_tmp))
    try:
        proc = run_job("index", *given, user=user_pkg, cwd=tmp_path, env=env, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    said = (
        r"^error: cluster\.cpus_per_worker=64 asks each worker for 64 CPU, more than the "
        r"embedded Ray has \(\d+\), so no worker could start"
    )
    assert re.search(said, _message(proc.stderr))
    assert _processes_naming(ray_tmp) == []
    assert not (tmp_path / "index").exists()  # refused before the store is written


def test_cli_names_the_row_whose_loss_is_nan_and_keeps_the_committed_shards(tmp_path, user_pkg):
    # Row 0 is checked before the index is created; row 70 only as its shard is indexed.
    given = _overrides(user_pkg, tmp_path, "+data.train.nan_row=70")
    proc = run_job("index", *given, user=user_pkg, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = _message(proc.stderr)
    said = r"non-finite loss \(NaN or inf\) for data\.train rows \[70\] \(1 of a batch of"
    assert re.search(said, message)
    committed = GradientIndex.open(str(tmp_path / "index")).committed().values()
    assert all(not rec.start <= 70 < rec.end for rec in committed)


def _join_auto(tmp_path, user_pkg):
    """`jobs.index cluster=ray` (cluster.address=auto) from a shell with no RAY_ADDRESS and
    an empty RAY_TMPDIR: no cluster that `ray start` recorded."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="gd-ray-"))
    env = {k: v for k, v in user_pkg.env(RAY_TMPDIR=str(ray_tmp)).items() if k != "RAY_ADDRESS"}
    try:
        return run_job("index", *_overrides(user_pkg, tmp_path), "cluster=ray", user=user_pkg,
                       cwd=tmp_path, env=env, timeout=300)  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_cli_with_no_cluster_to_join_says_how_to_start_one(tmp_path, user_pkg):
    # cluster=ray joins the cluster that `ray start` left this machine's address for: with
    # none, the job says so and how to go on (whether or not another test's Ray runs here).
    proc = _join_auto(tmp_path, user_pkg)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = _message(proc.stderr)
    assert re.search(r"no Ray cluster to join at cluster\.address=auto .*ray start --head", message)
    assert "cluster.address=null" in message
    assert not (tmp_path / "index").exists()  # refused before the store was written


def test_cli_does_not_join_another_processs_embedded_ray(tmp_path, user_pkg):
    # Ray's own `auto` falls back to any Ray running on the machine: another job's embedded
    # Ray, whose CPUs that job's workers hold (this job's would wait for them) and which
    # stops when that job ends. The job refuses it, naming it, at once.
    other = subprocess.Popen(
        [sys.executable, "-c", EMBEDDED_RAY], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        address = other.stdout.readline().strip()
        assert address, "the other process's Ray did not start"
        started = time.monotonic()
        proc = _join_auto(tmp_path, user_pkg)
    finally:
        other.kill()
        other.wait()
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = _message(proc.stderr)
    assert re.search(r"no Ray cluster to join at cluster\.address=auto .*ray start --head", message)
    assert address in message and "another process's own embedded Ray" in message
    assert "cluster.address=null" in message
    assert time.monotonic() - started < 60  # refused, not left waiting for its CPUs
    assert not (tmp_path / "index").exists()


# A process with an embedded Ray of its own (a notebook's, another job's): prints its
# address, then waits to be killed (Ray's processes die with it).
EMBEDDED_RAY = """
import ray, time
ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
print(ray.get_runtime_context().gcs_address, flush=True)
time.sleep(600)
"""


def test_cli_with_nothing_listening_at_the_address_is_refused_at_once(tmp_path, user_pkg):
    # Ray itself waits minutes for a head that does not answer; the job checks first.
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    overrides = [*_overrides(user_pkg, tmp_path), "cluster=ray", f"cluster.address={address}"]
    proc = run_job("index", *overrides, user=user_pkg, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = _message(proc.stderr)
    assert f"no Ray cluster to join at cluster.address={address}" in message
    assert "nothing accepted a connection" in message and "ray start --head" in message
    assert time.monotonic() - started < 60  # the process start and imports, not Ray's wait
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_cli_with_another_server_at_the_address_is_refused_not_waited_for(
    tmp_path, user_pkg, scheme
):
    # The dashboard's port given as the head's: Ray's join would wait for a GCS for good
    # (bare address), or fail after half a minute with the store already written (ray://).
    import http.server

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"{scheme}127.0.0.1:{server.server_address[1]}"
    started = time.monotonic()
    try:
        overrides = [*_overrides(user_pkg, tmp_path), "cluster=ray", f"cluster.address={address}"]
        proc = run_job("index", *overrides, user=user_pkg, cwd=tmp_path, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = _message(proc.stderr)
    assert f"no Ray cluster to join at cluster.address={address}" in message
    assert "accepted a connection but is not a Ray head" in message
    assert "answered as an HTTP/1 server" in message and "8265" in message
    assert time.monotonic() - started < 60
    assert not (tmp_path / "index").exists()


def test_cli_exits_2_when_hydra_refuses_the_command_line(tmp_path, user_pkg):
    # A misspelt key is refused by Hydra itself, before any grass_dist code runs. Hydra
    # advises `+compresion.k=64`, which would be refused in turn: the last word is ours,
    # with the setting that was meant.
    proc = run_job("index", "compresion.k=64", user=user_pkg, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Could not override 'compresion.k'" in proc.stderr
    assert "Traceback" not in proc.stderr
    said = r"compresion\.k is not a setting of grass_dist \(did you mean compression\.k\?\)"
    assert re.search(
        said + r", and `\+compresion\.k=\.\.\.` would be refused too", _message(proc.stderr)
    )
    assert not (tmp_path / "outputs" / "index").exists()


def test_cli_leaves_hydras_advice_alone_where_a_plus_adds_the_key(tmp_path, user_pkg):
    # model=custom's node is free-form: `+model.path=...` is the fix Hydra gives, and right.
    proc = run_job("index", "model.path=/x.pt", user=user_pkg, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "To append to your config use +model.path=/x.pt" in proc.stderr
    assert "not a setting" not in proc.stderr
    assert re.search(r"model\.path is not in the config yet.*: \+model\.path=/x\.pt$",
                     _message(proc.stderr))  # fmt: skip


HYDRA_REFUSALS = {
    "misspelt_preset": (
        "model=digits_mpl",
        r"model=digits_mpl is not a preset of model \(did you mean model=digits_mlp\?\); its "
        r"presets are custom, digits_cnn, digits_mlp, .* \(the files of conf/model/\)",
    ),
    "unknown_preset_added": (
        "+compression=nope",
        r"compression=nope is not a preset of compression; its presets are factgrass, ",
    ),
    "misspelt_group": (
        "compresion=grass",  # told compression.k, a setting, before
        r"compresion is neither a setting nor a preset group \(did you mean compression=grass\? "
        r"the groups are the folders of conf/: cluster, compression, data, ",
    ),
    "wrong_type": (
        "compression.k=many",
        r"compression\.k=many is refused \(Value 'many' of type 'str' could not be converted "
        r"to Integer\); compression\.k takes an integer \(default 256\): compressed size",
    ),
    "not_a_list": (
        "index.layers=fc1",
        r"index\.layers=fc1 is refused \(.*\); index\.layers takes a list, e\.g\. \[a,b\] "
        r"\(default null\)",
    ),
    "not_a_bool": (
        "cluster.driver_shard=maybe",
        r"cluster\.driver_shard=maybe is refused \(.*not a valid bool.*\); "
        r"cluster\.driver_shard takes true or false \(default true\)",
    ),
    "no_equals": (
        "compression.k",
        r"Hydra cannot read the argument 'compression\.k' \(missing EQUAL.*\): each one is "
        r"KEY=VALUE, e\.g\. compression\.k=64",
    ),
    "unclosed_list": (
        "index.layers=[fc1,fc2",
        r"Hydra cannot read the argument 'index\.layers=\[fc1,fc2' \(.*\): each one is KEY=VALUE",
    ),
    "empty_preset": (
        "compression=",
        r"compression= names none; its presets are factgrass, .* "
        r"\(the files of conf/compression/\)",
    ),
    "plus_on_a_setting": (
        "+compression.k=64",
        r"\+compression\.k adds a key, and compression\.k is already in the config: set it "
        r"without the \+, compression\.k=64$",
    ),
    "list_string_or_sweep": (
        "model=digits_mlp,digits_cnn",
        r"model=digits_mlp,digits_cnn is a list, a string or a sweep: write "
        r"model=\[digits_mlp,digits_cnn\] for a list, .* or add -m \(--multirun\) to run one "
        r"job per value",
    ),
}


@pytest.mark.parametrize(("given", "said"), HYDRA_REFUSALS.values(), ids=HYDRA_REFUSALS)
def test_cli_ends_each_of_hydras_refusals_with_the_fix(tmp_path, user_pkg, given, said):
    # Hydra's own text stays (its list of presets, its conversion error); the last word is
    # the one paragraph every refusal ends with.
    proc = run_job("index", given, user=user_pkg, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(said, _message(proc.stderr)), proc.stderr[-3000:]


def test_cli_serve_on_a_taken_port_names_it_before_anything_starts(tmp_path, user_pkg):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        given = _overrides(user_pkg, tmp_path, f"serve.port={port}")
        proc = run_job("serve", *given, user=user_pkg, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(
        rf"serve\.port={port} on serve\.host=127\.0\.0\.1 cannot be bound .*choose a free port",
        _message(proc.stderr),
    )
    assert not (tmp_path / "index").exists()


def test_cli_refuses_a_presets_unset_argument_before_ray_starts(tmp_path, user_pkg):
    # data=text_files leaves its paths `???`: refused only once Ray and two worker actors had
    # started (about 10 s); a config value, so before Ray.
    ray_tmp = Path(tempfile.mkdtemp(prefix="gd-ray-"))
    given = [
        "model=hf_causal_lm",
        "data=text_files",
        "task=causal_lm",
        f"run.output_dir={tmp_path}",
    ]
    try:
        proc = run_job("index", *given, user=user_pkg, cwd=tmp_path,
                       env=user_pkg.env(RAY_TMPDIR=str(ray_tmp)), timeout=300)  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert _message(proc.stderr) == (
            "error: data.train._target_=grass_dist.data.text.text_files needs paths, which the "
            "preset leaves unset: add data.train.paths=<value>"
        )
        assert "embedded Ray" not in proc.stderr and not any(ray_tmp.iterdir())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
