"""gc: removes attempt files no manifest version lists once past the grace period, keeps every
committed (or repair-replaced) file, and races with committers without losing a commit."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from grass_dist.errors import ShardCollectedError
from grass_dist.index import GradientIndex, ManifestLog, Store
from grass_dist.index.gc import collect


def _index(url: str) -> GradientIndex:
    return GradientIndex.create_or_open(url, {"layers": [{"name": "fc", "k": 4}]})


def _write(index: GradientIndex, i: int, value: float = 0.0):
    rows = np.arange(10 * i, 10 * i + 10)
    phi = {"fc": np.full((10, 4), value + i, np.float32)}
    return index.write_shard(f"s{i:03d}", rows[0], rows[-1] + 1, rows, [str(r) for r in rows], phi)


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path):
    return str(tmp_path / "idx") if request.param == "local" else f"memory://gc-{uuid.uuid4().hex}"


def test_gc_removes_old_uncommitted_attempts_only_and_reports_bytes(url, caplog):
    index = _index(url)
    committed = [_write(index, i) for i in range(3)]
    index.commit(committed)
    orphans = [_write(index, 7), _write(index, 1, value=0.5)]  # never committed; a duplicate
    bad = _write(index, 3, value=9.0)
    index.commit([bad])
    good = _write(index, 3)
    index.commit([good], replace={"s003": bad.attempt})  # the bad file stays: v2 lists it
    garbage = sum(r.nbytes for r in orphans)

    young = collect(index.store, grace_s=3600)
    assert (young.listed, young.young, young.removed, young.bytes_reclaimed) == (7, 2, 0, 0)
    with caplog.at_level(logging.INFO, logger="grass_dist"):
        dry = collect(index.store, grace_s=0, dry_run=True)
    assert (dry.removed, dry.bytes_reclaimed, dry.collected_in_version) == (2, garbage, None)
    assert all(index.store.exists(r.file) for r in orphans)
    for r in orphans:  # named, as the ones a real run would remove
        said = f"would remove uncommitted attempt file {index.store.url_of(r.file)} (gc.dry_run)"
        assert said in caplog.text

    done = collect(index.store, grace_s=0)
    assert (done.removed, done.bytes_reclaimed, done.committed) == (2, garbage, 5)
    assert done.collected_in_version == 4  # after the three commits: gc's own
    assert not any(index.store.exists(r.file) for r in orphans)
    assert index.store.exists(bad.file)
    for rec in index.committed().values():
        index.read(rec)  # present, and the sha256 matches
    again = collect(index.store, grace_s=0)
    assert (again.removed, again.bytes_reclaimed, again.collected_in_version) == (0, 0, None)


def test_grace_is_measured_from_the_files_modification_time(tmp_path):
    index = _index(str(tmp_path / "idx"))
    orphan = _write(index, 0)
    later = time.time() + 100
    assert collect(index.store, grace_s=200, now=later).removed == 0
    assert collect(index.store, grace_s=50, now=later).removed == 1
    assert not index.store.exists(orphan.file)


def _hook_before_gc_put(monkeypatch, action) -> None:
    """Run ``action`` once, just before gc's collecting manifest put."""
    original = Store.create_only
    fired = []

    def create_only(self, rel, data):
        if not fired and b'"collected"' in data:
            fired.append(rel)
            action()
        return original(self, rel, data)

    monkeypatch.setattr(Store, "create_only", create_only)


def test_a_commit_landing_while_gc_decides_keeps_its_file(tmp_path, monkeypatch):
    index = _index(str(tmp_path / "idx"))
    rec = _write(index, 0)
    writer = ManifestLog(Store(index.url))
    # gc has listed the file and read a state without it; the writer commits just then.
    _hook_before_gc_put(monkeypatch, lambda: writer.commit([rec]))
    report = collect(index.store, grace_s=0)
    assert report.removed == 0 and report.committed == 1
    assert index.store.exists(rec.file)
    index.read(ManifestLog(Store(index.url)).snapshot()[1]["s000"])


def test_a_commit_after_gc_collected_its_file_is_refused(tmp_path):
    index = _index(str(tmp_path / "idx"))
    writer = ManifestLog(Store(index.url))
    writer.commit([_write(index, 1)])  # the writer's state predates gc's collecting version
    rec = _write(index, 0)
    report = collect(index.store, grace_s=0)
    assert report.removed == 1 and not index.store.exists(rec.file)
    with pytest.raises(ShardCollectedError, match=rf"{rec.file}.*gc.grace_s"):
        writer.commit([rec])
    assert "s000" not in ManifestLog(Store(index.url)).snapshot()[1]
    retry = _write(index, 0)  # a new attempt commits as usual
    writer.commit([retry])
    assert writer.snapshot()[1]["s000"].attempt == retry.attempt


def test_gc_job_prints_what_it_reclaimed_and_refuses_a_missing_index(tmp_path):
    index = _index(str(tmp_path / "idx"))
    index.commit([_write(index, 0)])
    orphan = _write(index, 1)
    unfinished = "results/default/0123abcd/topk.parquet"  # a scoring run killed before it completed
    index.store.write_bytes(unfinished, b"12345")
    cmd = [sys.executable, "-m", "jobs.gc", f"run.output_dir={tmp_path}", "gc.grace_s=0"]
    done = subprocess.run([*cmd, f"store.url={index.url}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)["gc"]  # stdout holds the summary alone (logs: stderr)
    assert (report["removed"], report["bytes_reclaimed"]) == (1, orphan.nbytes)
    assert not index.store.exists(orphan.file)
    assert "removed uncommitted attempt file" in done.stderr
    assert (report["results"]["removed"], report["results"]["bytes_reclaimed"]) == (1, 5)
    assert not (tmp_path / "idx" / "results" / "default" / "0123abcd").exists()
    assert "members" not in report
    # An ensemble's member indexes (ckpt_<c>/) are collected with their root.
    members = [_index(str(tmp_path / "idx" / f"ckpt_{c}")) for c in range(2)]
    members[1].commit([_write(members[1], 0)])
    lost = _write(members[1], 1)
    members[1].store.write_bytes(unfinished, b"1234567")
    (tmp_path / "idx" / "ckpt_x").mkdir()  # not a member: left alone
    done = subprocess.run([*cmd, f"store.url={index.url}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout[done.stdout.index('{\n  "gc"') :])["gc"]
    assert sorted(report["members"]) == ["ckpt_0", "ckpt_1"]
    member = report["members"]["ckpt_1"]
    assert (member["removed"], member["bytes_reclaimed"]) == (1, lost.nbytes)
    assert (member["results"]["removed"], member["results"]["bytes_reclaimed"]) == (1, 7)
    assert report["members"]["ckpt_0"]["removed"] == 0 and report["removed"] == 0
    assert not members[1].store.exists(lost.file) and members[1].num_rows() == 10
    missing = subprocess.run(
        [*cmd, f"store.url={tmp_path / 'none'}"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no gradient index" in missing.stderr
