"""Credentials given to a job as config overrides: used by the job, saved nowhere in plain
text (outputs/logs/<time>/.hydra holds them as ***), and warned about."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from grass_dist import pipeline
from grass_dist.saved_config import credentials, is_credential, redact
from tests.conftest import ROOT, compose_cfg

AKID, SECRET, TOKEN, SHORT = "AKIDq7Zr2Yv9", "sEcReT/x81+Kw0", "tOkEn-5fG2hQ", "pw"


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("key", True),
        ("secret", True),
        ("token", True),
        ("password", True),
        ("aws_access_key_id", True),
        ("aws_secret_access_key", True),
        ("aws_session_token", True),
        ("sas_token", True),
        ("endpoint_url", False),
        ("region_name", False),
        ("anon", False),
        ("profile", False),
    ],
)
def test_credential_names(name, secret):
    assert is_credential(name) is secret


def test_redact_replaces_every_credential_under_storage_options_and_its_value_elsewhere():
    tree = {
        "store": {
            "url": "s3://b/p",
            "storage_options": {
                "key": AKID,
                "secret": SECRET,
                "anon": False,
                "client_kwargs": {"endpoint_url": "http://h:1", "aws_session_token": TOKEN},
                "config_kwargs": {"retries": {"max_attempts": 3}},
            },
        },
        "model": {"key": "not a credential: outside storage_options"},
        "hydra": {
            "overrides": {
                "task": [
                    f"+store.storage_options.key={AKID}",
                    f"++store.storage_options.password={SHORT}",
                    f"store.storage_options={{secret: {SECRET}}}",
                    "store.url=s3://b/p",
                ]
            },
            "job": {"override_dirname": f"+store.storage_options.secret={SECRET},x=1"},
        },
    }
    found = credentials(tree)
    assert found == {
        "store.storage_options.key": AKID,
        "store.storage_options.secret": SECRET,
        "store.storage_options.client_kwargs.aws_session_token": TOKEN,
    }
    clean = redact(tree, list(found.values()))
    options = clean["store"]["storage_options"]
    assert options["key"] == options["secret"] == "***" and options["anon"] is False
    assert options["client_kwargs"] == {"endpoint_url": "http://h:1", "aws_session_token": "***"}
    assert options["config_kwargs"] == {"retries": {"max_attempts": 3}}
    assert clean["model"] == tree["model"]
    assert clean["hydra"]["overrides"]["task"] == [
        "+store.storage_options.key=***",
        "++store.storage_options.password=***",  # short, but named by its override
        "store.storage_options={secret: ***}",
        "store.url=s3://b/p",
    ]
    assert clean["hydra"]["job"]["override_dirname"] == "+store.storage_options.secret=***,x=1"


def _gc(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = str(ROOT)
    given = [
        f"+store.storage_options.key={AKID}",
        f"+store.storage_options.secret={SECRET}",
        f"+store.storage_options.client_kwargs={{aws_session_token: {TOKEN}}}",
        f"+store.storage_options.password={SHORT}",
    ]
    return subprocess.run(
        [sys.executable, "-m", "jobs.gc", *args, f"run.output_dir={tmp_path}", *given],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_credentials_given_as_overrides_are_written_nowhere(tmp_path):
    # A local store takes (and ignores) the options, so the job runs as on S3: once refused
    # (no index yet: a failed run also saves its config), once done.
    failed = _gc(tmp_path)
    assert failed.returncode == 2, failed.stderr[-3000:]
    pipeline.prepare(compose_cfg(tmp_path))  # index.json, nothing computed
    done = _gc(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    saved = sorted((tmp_path / "logs").glob("*/.hydra/*.yaml"))
    assert [p.name for p in saved] == ["config.yaml", "hydra.yaml", "overrides.yaml"] * 2
    assert all("***" in p.read_text() for p in saved)
    for proc in (failed, done):
        assert "AWS_SECRET_ACCESS_KEY" in proc.stderr and "store.storage_options.key" in proc.stderr
    written = [("stdout+stderr", p.stdout + p.stderr) for p in (failed, done)]
    written += [(str(p), p.read_text(errors="replace")) for p in tmp_path.rglob("*") if p.is_file()]
    assert any("index.json" in where for where, _ in written)
    leaks = [(where, s) for where, text in written for s in (AKID, SECRET, TOKEN) if s in text]
    assert leaks == []
    overrides = [p for p in saved if p.name == "overrides.yaml"]
    assert all("password=***" in p.read_text() for p in overrides)  # short, yet not kept


def test_a_sweep_saves_its_config_without_the_credentials(tmp_path):
    # `-m`: Hydra's sweeper writes multirun.yaml itself, before the callback's first job.
    pipeline.prepare(compose_cfg(tmp_path))
    sweep = tmp_path / "sweep"
    proc = _gc(tmp_path, "-m", f"hydra.sweep.dir={sweep}", "run.name=a,b")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = sweep / "multirun.yaml"
    assert "store.storage_options.key=***" in saved.read_text()
    assert len(list(sweep.glob("*/.hydra/config.yaml"))) == 2  # the sweep's two jobs
    written = [p.stdout + p.stderr for p in [proc]]
    written += [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    assert [s for text in written for s in (AKID, SECRET, TOKEN) if s in text] == []


def test_a_store_url_with_credentials_in_it_is_refused_and_saved_without_them(tmp_path):
    # s3://user:password@bucket: saved in plain text under .hydra/, then refused by the S3
    # client as 'Invalid bucket name "***@bucket"' with a long regex.
    url = f"s3://{AKID}:{SECRET}@gdbucket/idx"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = str(ROOT)
    runs = {
        job: subprocess.run(
            [sys.executable, "-m", job, f"run.output_dir={tmp_path}", f"store.url={url}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
        for job in ("jobs.index", "jobs.gc")
    }
    for proc in runs.values():  # the secret's '/' hid the '@' from urlsplit: no refusal
        assert proc.returncode == 2, proc.stderr[-3000:]
        said = proc.stderr.partition("error: ")[2]
        assert said.startswith("store.url holds credentials before an '@' (s3://***@gdbucket/idx)")
        assert "give store.url=s3://gdbucket/idx, and the credentials as AWS_ACCESS_KEY_ID" in said
    saved = sorted((tmp_path / "logs").glob("*/.hydra/config.yaml"))
    assert len(saved) == 2 and all("s3://***:***@gdbucket/idx" in p.read_text() for p in saved)
    written = [p.stdout + p.stderr for p in runs.values()]
    written += [p.read_text() for p in tmp_path.rglob("*.yaml")]
    assert not [text for text in written if AKID in text or SECRET in text]
