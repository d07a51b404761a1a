"""Faults on a real S3 server: an outage in the middle of indexing, wrong credentials, and no
secret in anything the job writes or says."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
from torch.utils.data import TensorDataset

import grass_dist as gd
import jobs.index
from grass_dist import pipeline, run
from grass_dist.errors import ConfigError, StoreAccessDeniedError
from grass_dist.index import GradientIndex
from grass_dist.runtime.worker import plan_shards
from tests.conftest import ROOT, SMALL, compose_cfg
from tests.s3.conftest import Backend, phi_of_rows, s3_backend

pytestmark = pytest.mark.integration

FAST_RETRY = ("store.retries=2", "store.backoff_s=0.05", "store.backoff_max_s=0.1")


def _everything_written(backend: Backend, *roots: Path) -> Iterator[tuple[str, bytes]]:
    """(where, bytes) of every object under the index URL and every file under ``roots``."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **backend.storage_options)
    for path in fs.find(backend.url.removeprefix("s3://")):
        yield f"s3://{path}", fs.cat_file(path)
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                yield str(path), path.read_bytes()


def _ray_logs() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())


def test_outage_mid_index_then_rerun_loses_nothing_and_leaks_no_secret(
    ray_session, seaweedfs, tmp_path, capfd, monkeypatch
):
    backend = s3_backend(seaweedfs)
    shards = ("index.shard_size=8", "cluster.num_workers=1")  # 12 shards of the 90 rows
    commit = GradientIndex.commit

    def commit_then_outage(self, records, replace=None):
        version = commit(self, records, replace)
        seaweedfs.kill()  # the endpoint vanishes right after the job's first commit
        return version

    monkeypatch.setattr(GradientIndex, "commit", commit_then_outage)
    try:
        with pytest.raises(SystemExit) as failed:
            run.index(backend.cfg(tmp_path, *shards, *FAST_RETRY))
    finally:
        monkeypatch.undo()
        if seaweedfs.proc is None:
            seaweedfs.start()  # same ports and data directory: the bucket comes back
    failed_err = capfd.readouterr().err
    assert failed.value.code == 2
    (message,) = [line for line in failed_err.splitlines() if line.startswith("error: ")]
    for part in ("unreachable", seaweedfs.endpoint, backend.url, "rerun the same command"):
        assert part in message
    assert "Traceback" not in failed_err
    before = GradientIndex.open(backend.url, backend.storage_options).committed()
    assert 1 <= len(before) < 12

    summary = run.attribute(backend.cfg(tmp_path, *shards))
    assert summary["index"]["computed_shards"] == 12 - len(before)
    assert summary["index"]["skipped_shards"] == len(before)
    index = GradientIndex.open(backend.url, backend.storage_options)
    after = index.committed()
    assert {s: after[s] for s in before} == before  # nothing committed was lost or replaced
    spans = [(p.start, p.end) for p in plan_shards(90, 8, {})]  # 12 shards of 7 or 8 rows
    assert sorted((r.start, r.end) for r in after.values()) == spans  # each row exactly once
    job = pipeline.prepare(backend.cfg(tmp_path, *shards))
    for (record, data), want in zip(index.iter_committed(), phi_of_rows(job, spans), strict=True):
        assert np.array_equal(data.row_ids, want.row_ids), record.shard_id
        for layer, phi in want.phi.items():
            assert np.array_equal(data.phi[layer], phi), record.shard_id

    out, err = capfd.readouterr()
    written = [
        ("failed run's stderr", failed_err.encode()),
        ("stdout+stderr", (out + err).encode()),
    ]
    written += list(_everything_written(backend, tmp_path, _ray_logs()))
    assert any(where.endswith("index.json") for where, _ in written)
    assert any("/results/default/" in where for where, _ in written)
    assert any("/_manifests/" in where for where, _ in written)
    secret = seaweedfs.secret_key.encode()
    assert [where for where, data in written if secret in data] == []


def test_wrong_credentials_name_endpoint_and_bucket(seaweedfs, tmp_path, capfd):
    backend = s3_backend(seaweedfs)
    wrong = secrets.token_urlsafe(24)
    backend.storage_options = seaweedfs.storage_options(secret=wrong)
    cfg = backend.cfg(tmp_path, *FAST_RETRY)
    with pytest.raises(SystemExit) as failed:
        run.index(cfg)
    err = capfd.readouterr().err
    assert failed.value.code == 2
    # The credentials came from the config: the fix names it, not the environment.
    given = "check the credentials given in store.storage_options, which this job used"
    for part in ("access denied", seaweedfs.endpoint, "bucket 'grass'", given):
        assert part in err
    assert "Traceback" not in err
    with pytest.raises(StoreAccessDeniedError) as denied:
        pipeline.prepare(cfg)
    for text in (err, str(denied.value), repr(denied.value.args)):
        assert wrong not in text and seaweedfs.secret_key not in text


def test_a_misspelt_bucket_is_named_and_not_created(seaweedfs, tmp_path):
    # SeaweedFS creates a bucket at the first put: the write probe's put made the typo a
    # new bucket (or, with no free volume, read as "endpoint unreachable" after retries).
    backend = s3_backend(seaweedfs)
    cfg = backend.cfg(tmp_path, "store.url=s3://grass-typo/idx", *FAST_RETRY)
    said = r"the bucket 'grass-typo' of the index store s3://grass-typo/idx does not exist at "
    said += r"endpoint http://127\.0\.0\.1:\d+\. Fix: "
    with pytest.raises(ConfigError, match=said) as info:
        pipeline.prepare(cfg)
    fs = s3fs.S3FileSystem(**seaweedfs.storage_options())
    assert not fs.exists("grass-typo") and fs.exists(seaweedfs.bucket)
    # The fix it names, run as written with the credentials and endpoint in the environment.
    fix = re.search(r'python -c "(.+)"\)$', str(info.value)).group(1)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": seaweedfs.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key,
        "AWS_ENDPOINT_URL": seaweedfs.endpoint,
    }
    subprocess.run([sys.executable, "-c", fix], env=env, check=True, timeout=60)
    fs.invalidate_cache()
    assert fs.exists("grass-typo")
    assert pipeline.prepare(cfg).index.store.url_of("") == "s3://grass-typo/idx"


@pytest.mark.parametrize(
    ("given", "lacks", "fix"),
    [
        (("secret",), "key", "give both (+store.storage_options.key=...) or neither ("),
        (("key",), "secret", "give both (+store.storage_options.secret=...) or neither ("),
        (
            ("key", "token"),
            "secret",
            "give key, secret and token (+store.storage_options.secret=...) or none of them (",
        ),
    ],
)
def test_half_given_credentials_are_refused_before_the_store_is_touched(
    seaweedfs, tmp_path, capfd, given, lacks, fix
):
    # Not botocore's PartialCredentialsError at the first request, whose fix pointed at the
    # environment variables (which may be set already).
    backend = s3_backend(seaweedfs)
    values = {"key": seaweedfs.access_key, "secret": seaweedfs.secret_key}
    values["token"] = secrets.token_urlsafe(24)
    cfg = compose_cfg(
        tmp_path,
        "store=s3",
        f"store.url={backend.url}",
        f"store.storage_options.endpoint_url={seaweedfs.endpoint}",
        *(f"+store.storage_options.{name}={values[name]}" for name in given),
    )
    with pytest.raises(SystemExit) as refused:
        jobs.index.main(cfg)
    out, err = capfd.readouterr()
    assert refused.value.code == 2
    said = f"error: store.storage_options gives {' and '.join(given)} but not {lacks}: {fix}"
    assert said in err, err[-3000:]
    assert "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in err and "Traceback" not in err
    assert [name for name in given if values[name] in out + err] == []
    assert list(_everything_written(backend)) == []


def test_the_python_api_refuses_a_key_without_its_secret(seaweedfs, tmp_path):
    backend = s3_backend(seaweedfs)
    model, train = torch.nn.Linear(4, 3), TensorDataset(torch.rand(8, 4), torch.arange(8) % 3)
    options = {"endpoint_url": seaweedfs.endpoint, "key": seaweedfs.access_key}
    with pytest.raises(ConfigError) as refused:
        gd.Index.build(model, train, store=backend.url, storage_options=options, workers=1,
                       overrides=[f"run.output_dir={tmp_path}"])  # fmt: skip
    said = str(refused.value)
    assert said.startswith("store.storage_options gives key but not secret: give both (")
    assert said.endswith("(in the Python API: storage_options= sets store.storage_options)")
    assert seaweedfs.access_key not in said
    assert list(_everything_written(backend)) == []


def test_credentials_given_as_overrides_reach_the_store_and_nothing_written(seaweedfs, tmp_path):
    # README says to keep credentials in the environment; a user who gives them on the
    # command line anyway gets a working job, a warning, and no copy of them in any file:
    # the config Hydra saves under logs/, the index, Ray's logs, or what the job prints.
    backend = s3_backend(seaweedfs)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    ray_tmp = Path(tempfile.mkdtemp(prefix="gd-ray-"))  # short: Ray's socket paths
    env.update(PYTHONPATH=str(ROOT), RAY_TMPDIR=str(ray_tmp))
    given = [
        "store=s3",
        f"store.url={backend.url}",
        f"+store.storage_options.key={seaweedfs.access_key}",
        f"+store.storage_options.secret={seaweedfs.secret_key}",
        f"+store.storage_options.client_kwargs.endpoint_url={seaweedfs.endpoint}",
        f"run.output_dir={tmp_path / 'outputs'}",
        *SMALL,
        "cluster.num_workers=2",  # with one, the driver indexes alone and no Ray starts
    ]
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.index", *given],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "AWS_SECRET_ACCESS_KEY" in proc.stderr  # the warning
        written = [("stdout+stderr", (proc.stdout + proc.stderr).encode())]
        written += list(_everything_written(backend, tmp_path, ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert any(where.endswith("index.json") for where, _ in written)
    assert any("/_progress/" in where for where, _ in written)
    assert any(where.endswith(".hydra/overrides.yaml") for where, _ in written)
    assert any("session_" in where for where, _ in written)  # Ray's logs were scanned
    for secret in (seaweedfs.access_key, seaweedfs.secret_key):
        assert [where for where, data in written if secret.encode() in data] == []
