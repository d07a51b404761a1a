"""The index on both backends, a local directory and a real S3 server (SeaweedFS): full jobs,
racing committers, integrity repair and appends behave the same on each."""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import numpy as np
import pytest
import torch

from grass_dist import pipeline, run
from grass_dist.build import build_dataset, build_model
from grass_dist.errors import CorruptShardError, FingerprintMismatchError
from grass_dist.index import GradientIndex, ManifestLog, ShardRecord, Store
from grass_dist.index import store as store_module
from grass_dist.index.manifest import latest, manifest_path
from grass_dist.scoring import results
from tests.helpers import layer_grad, per_sample_grads
from tests.s3 import committer
from tests.s3.conftest import index_in_process, phi_of_rows

pytestmark = pytest.mark.integration


def _run(cfg, *stages):
    job = pipeline.prepare(cfg)
    try:
        return job, [stage(job) for stage in stages]
    finally:
        pipeline.shutdown(job)


def _open(backend, url=None) -> GradientIndex:
    return GradientIndex.open(url or backend.url, backend.storage_options)


def _rows(index: GradientIndex) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    parts = [data for _, data in index.iter_committed()]
    phi = {n: np.concatenate([d.phi[n] for d in parts]) for n in parts[0].phi}
    return np.concatenate([d.row_ids for d in parts]), phi


def _exact_influence(job, damping: float) -> torch.Tensor:
    """(n_train, n_query) damped-Fisher influence from exact per-sample gradients, float64."""
    model = build_model(job.cfg).double()

    def grads(ds):
        x = torch.stack([ds[i][0] for i in range(len(ds))]).double()
        y = torch.stack([ds[i][1] for i in range(len(ds))])
        g = per_sample_grads(model, x, y)
        return {n: layer_grad(g, n).reshape(len(ds), -1) for n in ("fc1", "out")}

    g_train, g_query = (
        grads(build_dataset(job.cfg, "train")),
        grads(build_dataset(job.cfg, "query")),
    )
    n = next(iter(g_train.values())).shape[0]
    out = 0
    for name, g in g_train.items():
        h = g.T @ g / n
        lam = damping * torch.trace(h) / h.shape[0]
        out = out + g @ torch.linalg.solve(
            h + lam * torch.eye(h.shape[0], dtype=h.dtype), g_query[name].T
        )
    return out


def test_racing_committer_processes_lose_and_duplicate_nothing(backend):
    procs, per_proc = 4, 4
    GradientIndex.create_or_open(
        backend.url,
        {"layers": [{"name": committer.LAYER, "k": committer.K}]},
        backend.storage_options,
    )
    ctx = mp.get_context("spawn")  # fresh interpreters: never fork a process running Ray
    barrier, lost, hold = ctx.Barrier(procs), ctx.Value("i", 0), ctx.Event()
    workers = [
        ctx.Process(
            target=committer.commit_shards,
            args=(
                backend.url,
                backend.storage_options,
                p,
                list(range(p, procs * per_proc, procs)),
                barrier,
                lost,
                3,  # checkpoint every 3 versions: readers load checkpoints mid-race
                hold,  # the committers wait after their first commit for a reader to see it
            ),
        )
        for p in range(procs)
    ]
    for w in workers:
        w.start()
    # Each version adds exactly one shard, so a state at version v lists v shards: a reader
    # racing the committers (fresh, or kept and catching up) must never see anything else.
    kept, seen = ManifestLog(Store(backend.url, backend.storage_options)), []
    while any(w.is_alive() for w in workers):
        seen += [latest(Store(backend.url, backend.storage_options)), kept.snapshot()]
        if any(v > 0 for v, _ in seen):
            hold.set()
        time.sleep(0.01)
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    index = _open(backend)
    version, records = latest(index.store)
    for v, snapshot in seen:
        assert len(snapshot) == v
        assert all(rec == records[sid] for sid, rec in snapshot.items())
    assert any(0 < v < version for v, _ in seen)  # the readers ran mid-race
    assert index.store.list("_manifests/checkpoints")
    assert sorted(records) == ["dup", *(f"s{s:03d}" for s in range(procs * per_proc))]
    assert version == procs * per_proc + 1  # one manifest per commit that added a shard
    assert lost.value > 0  # lockstep commits did collide: conflicts were detected, not lost
    for sid, record in records.items():
        data = index.read(record)
        if sid != "dup":
            np.testing.assert_array_equal(data.phi["fc"], committer.phi_of(int(sid[1:]))["fc"])


def _damage(index: GradientIndex, records: dict[str, ShardRecord]) -> tuple[str, str]:
    """Truncate the first shard's file and flip one byte of the last one's; return their ids."""
    first, last = sorted(records)[0], sorted(records)[-1]
    raw = index.store.read_bytes(records[first].file)
    index.store.write_bytes(records[first].file, raw[: len(raw) // 2])
    raw = bytearray(index.store.read_bytes(records[last].file))
    raw[len(raw) // 2] ^= 0xFF
    index.store.write_bytes(records[last].file, bytes(raw))
    return first, last


def test_repair_recomputes_only_the_bad_shards(ray_session, backend, tmp_path):
    index = index_in_process(backend.cfg(tmp_path)).index
    (version, before), clean = latest(index.store), _rows(index)
    truncated, altered = _damage(index, before)
    for sid in (truncated, altered):
        with pytest.raises(CorruptShardError, match=before[sid].file):
            index.read(before[sid])

    summary = run.index(backend.cfg(tmp_path, "cluster.num_workers=1", "index.repair=true"))
    repair = summary["repair"]
    assert repair["checked_shards"] == 3
    assert sorted(repair["bad_shards"]) == sorted([truncated, altered])
    assert before[truncated].file in repair["bad_shards"][truncated]
    assert "sha256" in repair["bad_shards"][altered]
    assert summary["index"]["computed_shards"] == 0
    after = index.committed()
    assert {s for s in after if after[s] != before[s]} == {truncated, altered}
    rows, phi = _rows(index)  # verified reads of every shard
    assert np.array_equal(rows, clean[0])
    for layer in phi:  # the workers recomputed exactly the bits computed here before
        assert np.array_equal(phi[layer], clean[1][layer])
    replaced = {}  # every repair commit names the attempts it swapped out
    for v in range(version + 1, latest(index.store)[0] + 1):
        replaced.update(json.loads(index.store.read_bytes(manifest_path(v)))["replaced"])
    assert replaced == {sid: before[sid].attempt for sid in (truncated, altered)}
    assert index.store.exists(before[truncated].file)  # old files are never deleted


def test_append_computes_new_shards_and_scores_the_whole_index(ray_session, backend, tmp_path):
    # Every process of the job reaches the store: workers write the new shard, the reducer
    # the preconditioner, scorer tasks the dense parts. The model is pinned to 64 training
    # rows, so growing data.train keeps the same model (and fingerprint).
    common = ("model.n_train=64", "compression=identity", "scoring.dense=true")
    index_in_process(backend.cfg(tmp_path, "data.train.n_train=64", *common))
    first = _open(backend).committed()
    job, (stats, pre, score) = _run(
        backend.cfg(tmp_path, *common, "cluster.num_workers=2"),  # data.train.n_train=90
        pipeline.run_index,
        pipeline.run_precondition,
        pipeline.run_score,
    )
    assert stats == {"computed_shards": 1, "skipped_shards": 2, "rows": 26, "driver_shards": 0}
    assert pre["rows"] == 90 and score["train_rows"] == 90
    index = _open(backend)
    grown = index.committed()
    assert {s: grown[s] for s in first} == first  # old shards untouched
    rows, phi = _rows(index)
    assert rows.tolist() == list(range(90))
    new = phi_of_rows(job, [(64, 90)])[0]
    for layer, x in new.phi.items():
        assert np.array_equal(phi[layer][64:], x)
    dense = torch.tensor(results.load_dense(index, "default"), dtype=torch.float64)
    expected = _exact_influence(job, damping=0.1)  # from all 90 rows
    assert dense.shape == (90, 12)
    assert float((dense - expected).norm() / expected.norm()) < 1e-4
    if backend.name == "s3":
        assert not (tmp_path / "index").exists()  # nothing fell back to local disk
    with pytest.raises(FingerprintMismatchError, match="data.train.seed"):
        pipeline.prepare(backend.cfg(tmp_path, *common, "data.train.seed=1"))


def test_large_objects_are_read_in_ranges_into_one_buffer(backend, monkeypatch):
    monkeypatch.setattr(store_module, "_RANGE_BYTES", 64 * 1024)  # many ranges, small data
    store = Store(backend.url, backend.storage_options)
    payload = np.random.default_rng(0).bytes(1_000_003)
    store.write_bytes("big.bin", payload)
    assert bytes(store.read_buffer("big.bin")) == payload
    store.write_bytes("small.bin", b"one range")
    assert bytes(store.read_buffer("small.bin")) == b"one range"
    with pytest.raises(FileNotFoundError):
        store.read_buffer("absent.bin")


def test_an_object_created_after_a_listing_is_read(backend):
    # s3fs keeps listings; a read must not take the listing's word that an object is missing
    # (manifest readers read versions newer than their last listing).
    reader = Store(backend.url, backend.storage_options)
    reader.write_bytes("d/a", b"a")
    assert reader.list("d") == ["a"]
    other = {**backend.storage_options, "skip_instance_cache": True}  # another process's view
    Store(backend.url, other).write_bytes("d/b", b"b")
    assert reader.read_bytes("d/b") == b"b" and bytes(reader.read_buffer("d/b")) == b"b"
