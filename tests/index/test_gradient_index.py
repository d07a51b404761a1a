"""Manifests (exactly-once commits) and GradientIndex, on a local dir and on memory://."""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest

from grass_dist.errors import (
    CommitConflictError,
    CorruptIndexError,
    CorruptShardError,
    FingerprintMismatchError,
    IndexNotFoundError,
    StoreUnavailableError,
)
from grass_dist.index import GradientIndex, ShardRecord, Store, commit, fingerprint_diff, latest
from grass_dist.index.fingerprint import _MISSING
from grass_dist.index.manifest import manifest_path
from grass_dist.runtime.progress import JobProgress

FP = {
    "model": {"name": "mlp", "hash": "abc123"},
    "compressor": {"kind": "factgrass", "seed": 7, "k_in": 4},
    "layers": [{"name": "fc1", "k": 6}, {"name": "fc2", "k": 3}],
    "dtype": "float32",
    "data": {"name": "digits", "n": 100},
}


def _rec(shard_id: str, attempt: str = "a", start: int = 0, rows: int = 1) -> ShardRecord:
    return ShardRecord(
        shard_id, start, start + rows, rows, f"shards/{shard_id}/{attempt}", "0", 1, attempt
    )


def _rows(start: int, end: int, seed: int = 0) -> tuple[np.ndarray, list[str], dict]:
    rng = np.random.default_rng(seed)
    n = end - start
    phi = {"fc2": rng.standard_normal((n, 3)), "fc1": rng.standard_normal((n, 6))}
    return np.arange(start, end), [f"row-{i}" for i in range(start, end)], phi


# ---- manifests ---------------------------------------------------------------------------
def test_commit_merges_and_first_attempt_wins(url, caplog):
    store = Store(url)
    assert latest(store) == (0, {})
    assert commit(store, [_rec("s0"), _rec("s1", start=1)]) == 1
    assert commit(store, [_rec("s2", start=2)]) == 2
    with caplog.at_level(logging.INFO, logger="grass_dist.index.manifest"):
        assert commit(store, [_rec("s1", attempt="b", start=1)]) == 2  # nothing new: no write
    assert "ignoring duplicate attempt b" in caplog.text
    assert commit(store, [_rec("s3", "x", 3), _rec("s3", "y", 3), _rec("s0", "z")]) == 3
    version, records = latest(store)
    assert version == 3 and sorted(records) == ["s0", "s1", "s2", "s3"]
    assert records["s1"].attempt == "a" and records["s3"].attempt == "x"
    assert records["s0"].attempt == "a"
    assert store.list("_manifests") == [f"{v:010d}.json" for v in (1, 2, 3)]


def test_latest_skips_unreadable_manifest_and_commit_refuses(url, caplog):
    store = Store(url)
    commit(store, [_rec("s0")])
    store.write_bytes(manifest_path(2), b"{not json")
    store.write_bytes("_manifests/README", b"ignored")
    assert latest(store)[0] == 1
    caplog.clear()
    said = r"0000000002\.json is unreadable, .*Fix: if no other job is writing to this index, "
    with caplog.at_level(logging.WARNING), pytest.raises(CorruptIndexError, match=said):
        commit(store, [_rec("s1")], max_attempts=3)
    # Said once, not at every retry of the commit (it was logged at each of them).
    assert caplog.text.count("0000000002.json is unreadable") == 1
    # The fix it names: the file moved out of _manifests/, the commit builds on version 1.
    store.write_bytes("damaged-0000000002.json", store.read_bytes(manifest_path(2)))
    store.delete(manifest_path(2))
    assert commit(store, [_rec("s1")]) == 2 and sorted(latest(store)[1]) == ["s0", "s1"]


def test_commit_gives_up_after_max_attempts(url, monkeypatch):
    store = Store(url)
    store.check_create_only()  # the probe passes before every put starts losing
    monkeypatch.setattr(Store, "create_only", lambda self, rel, data: False)
    with pytest.raises(CommitConflictError, match="after 3 attempts"):
        commit(store, [_rec("s0")], max_attempts=3)


def test_racing_threads_lose_nothing_and_duplicate_nothing(tmp_path):
    store = Store(str(tmp_path / "race"))
    versions: list[int] = []
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for j in range(5):
                # Every thread also re-commits shard "dup" under its own attempt id.
                recs = [_rec(f"t{t}-{j}", start=100 * t + j), _rec("dup", attempt=f"t{t}")]
                versions.append(commit(Store(store.url), recs))
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    version, records = latest(store)
    assert len(records) == 8 * 5 + 1
    assert len(set(versions)) == len(versions) == 40  # every commit wrote its own version
    assert version == max(versions) == 40
    # "dup" was first committed in version 1; no later manifest replaced it.
    first = json.loads(store.read_bytes(manifest_path(1)))["records"]["dup"]["attempt"]
    assert records["dup"].attempt == first


_COMMITTER = """
import sys
from grass_dist.index import ShardRecord, Store, commit
url, p = sys.argv[1], int(sys.argv[2])
for j in range(5):
    sid = f"p{p}-{j}"
    commit(Store(url), [ShardRecord(sid, 10 * p + j, 10 * p + j + 1, 1, sid, "0", 1, "a")])
"""


def test_racing_processes(tmp_path):
    # Separate interpreters (not fork: the test process may already run threads or Ray).
    url = str(tmp_path / "procs")
    procs = [
        subprocess.Popen([sys.executable, "-c", _COMMITTER, url, str(p)], stderr=subprocess.PIPE)
        for p in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)  # a hang guard: 4 interpreters import torch
        assert proc.returncode == 0, err.decode()
    version, records = latest(Store(url))
    assert version == 20 and len(records) == 20


# ---- GradientIndex -----------------------------------------------------------------------
def test_create_open_and_fingerprint_order_independent(url):
    idx = GradientIndex.create_or_open(url, FP)
    assert idx.layers == [("fc1", 6), ("fc2", 3)] and idx.dtype == "float32"
    reordered = {k: FP[k] for k in reversed(list(FP))}
    again = GradientIndex.create_or_open(url, reordered)
    assert again.fingerprint == idx.fingerprint
    assert GradientIndex.open(url).fingerprint == json.loads(json.dumps(FP))


def test_fingerprint_mismatch_names_differing_keys(url):
    GradientIndex.create_or_open(url, FP)
    other = json.loads(json.dumps(FP))
    other["compressor"]["seed"] = 8
    other["layers"][1]["k"] = 4
    other["extra"] = "x" * 500
    with pytest.raises(FingerprintMismatchError) as info:
        GradientIndex.create_or_open(url, other)
    msg = str(info.value)
    assert "compressor.seed: stored=7 requested=8" in msg
    assert "layers['fc2'].k: stored=3 requested=4" in msg
    assert "extra: stored=<missing>" in msg and "x" * 100 not in msg  # long values truncated
    assert "store.url" in msg and "model.name" not in msg
    assert "It holds no committed shard" in msg and "nothing is lost by deleting it" in msg

    idx = GradientIndex.open(url)
    idx.commit([idx.write_shard("0000", 0, 5, *_rows(0, 5))])
    with pytest.raises(FingerprintMismatchError) as info:
        GradientIndex.create_or_open(url, other)
    assert "no committed shard" not in str(info.value)  # deleting it would lose rows


def test_a_mismatch_on_an_index_a_running_job_writes_says_not_to_delete_it(url):
    # Two jobs started together on one new store.url: the loser of the race must not be told
    # that deleting the index loses nothing while the winner is about to commit to it.
    GradientIndex.create_or_open(url, FP)
    other = json.loads(json.dumps(FP))
    other["compressor"]["seed"] = 8
    winner = JobProgress(Store(url), "20261203-120000-abcdef", bar=False)
    winner.begin("index")
    with pytest.raises(FingerprintMismatchError) as info:
        GradientIndex.create_or_open(url, other)
    msg = str(info.value)
    assert "job 20261203-120000-abcdef is writing it" in msg and "do not delete it" in msg
    assert "nothing is lost" not in msg
    winner.finish(RuntimeError("stopped"))
    with pytest.raises(FingerprintMismatchError) as info:
        GradientIndex.create_or_open(url, other)
    assert "Once no job writes it, nothing is lost by deleting it" in str(info.value)


def test_a_mismatch_in_the_weights_alone_names_a_factory_that_is_not_deterministic(url):
    # The settings are the same and only the weights differ: another checkpoint, or a
    # factory that initialises at random, whose index "the same settings" can never match.
    model = {"target": "my_pkg.models.build", "state_sha256": "ab" * 32}
    GradientIndex.create_or_open(url, {**FP, "model": model})
    with pytest.raises(FingerprintMismatchError) as info:
        GradientIndex.create_or_open(url, {**FP, "model": {**model, "state_sha256": "cd" * 32}})
    msg = str(info.value)
    assert "Fix: the model's weights differ from those the index was built with" in msg
    assert "a model factory that builds other weights on every call" in msg
    assert "rerun with the same" not in msg


def test_an_index_written_before_the_models_settings_were_fingerprinted_still_opens(url):
    # Its fingerprint holds the weights' hash alone: compared without the settings' hash,
    # which an index written since holds and compares.
    model = {"target": "my_pkg.models.build", "state_sha256": "ab" * 32}
    GradientIndex.create_or_open(url, {**FP, "model": model})
    now = {**FP, "model": {**model, "settings_sha256": "ef" * 32}}
    assert GradientIndex.create_or_open(url, now).fingerprint["model"] == model
    GradientIndex.create_or_open(url + "-new", now)
    with pytest.raises(FingerprintMismatchError, match=r"model\.settings_sha256: stored="):
        GradientIndex.create_or_open(url + "-new", {**FP, "model": model})


def test_a_mismatch_with_an_index_built_from_objects_says_to_score_it_in_python(url):
    # The Python API records an object it was given by content; a job's config names a
    # factory, and no rerun "with the same settings" can name that object.
    node = {"_target_": "grass_dist.assembly.in_memory", "sha256": "ab" * 32, "type": "model"}
    GradientIndex.create_or_open(url, {**FP, "model": node})
    with pytest.raises(FingerprintMismatchError) as info:
        GradientIndex.create_or_open(url, FP)
    msg = str(info.value)
    assert "Fix: this index was built from Python objects" in msg
    assert "score it with Index.attribute, from any process once Index.build" in msg
    assert "rerun with the same" not in msg


def test_fingerprint_diff_names_the_layers_added_left_out_or_moved():
    fc1, fc2 = {"name": "fc1", "k": 6}, {"name": "fc2", "k": 3}
    big = {"name": "enc.self_attn.out_proj", "k": 144, "d_in": 8, "method": "factgrass"}
    assert fingerprint_diff({"layers": [fc1, fc2]}, {"layers": [fc1, big, fc2]}) == [
        ("layers['enc.self_attn.out_proj']", _MISSING, big)
    ]
    assert fingerprint_diff({"layers": [fc1, fc2]}, {"layers": [fc1]}) == [
        ("layers['fc2']", fc2, _MISSING)
    ]
    assert fingerprint_diff({"layers": [fc1, fc2]}, {"layers": [fc2, fc1]}) == [
        ("layers (order)", ["fc1", "fc2"], ["fc2", "fc1"])
    ]


def test_concurrent_create_or_open(tmp_path):
    url = str(tmp_path / "created")
    results: list[object] = []

    def create() -> None:
        try:
            results.append(GradientIndex.create_or_open(url, FP).fingerprint)
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == [json.loads(json.dumps(FP))] * 8


def test_open_missing_index(url):
    with pytest.raises(IndexNotFoundError, match=r"python -m jobs\.index"):
        GradientIndex.open(url)


def test_a_lost_index_file_is_not_recreated_over_its_shards(url):
    # Without index.json the next job would create one with its own fingerprint and adopt
    # the committed shards (other k, other seed) as its own.
    idx = GradientIndex.create_or_open(url, FP)
    idx.commit([idx.write_shard("0000", 0, 10, *_rows(0, 10))])
    idx.store.delete("index.json")
    other = {**FP, "compression": {"method": "factgrass", "seed": 1}}
    with pytest.raises(CorruptIndexError, match=r"index\.json is missing, but the store holds "
                       r"an index's commit log \(1 entries under _manifests/\)"):  # fmt: skip
        GradientIndex.create_or_open(url, other)
    assert not idx.store.exists("index.json")


def test_write_commit_iterate(url):
    idx = GradientIndex.create_or_open(url, FP)
    recs = [
        idx.write_shard(f"{i:04d}", 10 * i, 10 * i + 10, *_rows(10 * i, 10 * i + 10, i))
        for i in (2, 0, 1)
    ]
    assert recs[0].rows == 10 and recs[0].file.startswith("shards/0002/")
    assert idx.committed() == {} and idx.num_rows() == 0  # written is not committed
    assert idx.commit(recs) == 1
    got = list(idx.iter_committed())
    assert [r.start for r, _ in got] == [0, 10, 20]
    row_ids = np.concatenate([d.row_ids for _, d in got])
    assert row_ids.tolist() == list(range(30)) and idx.num_rows() == 30
    _, first = got[0]
    assert list(first.phi) == ["fc1", "fc2"]  # fingerprint layer order, not the caller's
    np.testing.assert_array_equal(first.phi["fc1"], _rows(0, 10, 0)[2]["fc1"].astype(np.float32))
    only = next(idx.iter_committed(layers=["fc2"]))[1]
    assert list(only.phi) == ["fc2"]


def test_duplicate_attempts_and_orphans_never_add_rows(url):
    idx = GradientIndex.create_or_open(url, FP)
    first = idx.write_shard("0000", 0, 5, *_rows(0, 5, seed=1))
    retry = idx.write_shard("0000", 0, 5, *_rows(0, 5, seed=2))
    idx.write_shard("0001", 5, 10, *_rows(5, 10))  # orphan: written but never committed
    assert first.file != retry.file
    idx.commit([first])
    idx.commit([retry])
    got = list(idx.iter_committed())
    assert len(got) == 1 and got[0][0].attempt == first.attempt and idx.num_rows() == 5
    np.testing.assert_array_equal(
        got[0][1].phi["fc2"], _rows(0, 5, seed=1)[2]["fc2"].astype(np.float32)
    )


def test_write_shard_refuses_wrong_layers(url):
    idx = GradientIndex.create_or_open(url, FP)
    row_ids, keys, phi = _rows(0, 4)
    phi["fc2"] = phi["fc2"][:, :2]
    with pytest.raises(FingerprintMismatchError, match="fc2"):
        idx.write_shard("0000", 0, 4, row_ids, keys, phi)
    with pytest.raises(ValueError, match="shard_id"):
        idx.write_shard("../evil", 0, 4, *_rows(0, 4))


def test_read_checks_sha_and_row_count(url):
    idx = GradientIndex.create_or_open(url, {**FP, "dtype": "bfloat16"})
    rec = idx.write_shard("0000", 0, 4, *_rows(0, 4))
    with pytest.raises(CorruptShardError, match="manifest says 5"):
        idx.read(ShardRecord(**{**rec.__dict__, "rows": 5}))
    idx.store.write_bytes(rec.file, idx.store.read_bytes(rec.file)[:-10])
    with pytest.raises(CorruptShardError, match=rec.file):
        idx.read(rec)


def test_a_record_that_names_another_shards_file_is_refused_not_read_twice(url):
    # A manifest entry edited (or restored from elsewhere) to name shard 0001's file, sha256
    # and all: every check passed, and rows 4..7 were scored twice and rows 0..3 never.
    idx = GradientIndex.create_or_open(url, FP)
    first = idx.write_shard("0000", 0, 4, *_rows(0, 4))
    second = idx.write_shard("0001", 4, 8, *_rows(4, 8))
    moved = {k: getattr(second, k) for k in ("file", "sha256", "nbytes", "attempt")}
    edited = ShardRecord(**{**first.__dict__, **moved})
    said = r"holds rows 4\.\.7, not shard 0000's rows 0\.\.3 \(its manifest entry names another"
    for verify in (True, False):
        with pytest.raises(CorruptShardError, match=said):
            idx.read(edited, verify=verify)
    assert "not shard 0000's rows 0..3" in idx.check_shard(edited)  # what repair recomputes
    assert idx.check_shard(first) is None and idx.read(second).row_ids.tolist() == [4, 5, 6, 7]


def test_pickle_round_trip(url):
    idx = GradientIndex.create_or_open(url, FP, storage_options={})
    rec = idx.write_shard("0000", 0, 3, *_rows(0, 3))
    idx.commit([rec])
    clone = pickle.loads(pickle.dumps(idx))
    assert clone.store == idx.store and clone.fingerprint == idx.fingerprint
    assert clone.num_rows() == 3 and len(clone.read(rec)) == 3


def test_artifacts(url):
    idx = GradientIndex.create_or_open(url, FP)
    assert not idx.has_artifact("preconditioner/main.safetensors")
    idx.put_artifact("preconditioner/main.safetensors", b"v1")
    idx.put_artifact("preconditioner/main.safetensors", b"v2")
    assert idx.get_artifact("preconditioner/main.safetensors") == b"v2"
    for reserved in ("index.json", "_manifests/0000000009.json", "shards/x/y.parquet"):
        with pytest.raises(ValueError, match="reserved"):
            idx.put_artifact(reserved, b"x")


def test_secrets_not_in_repr_or_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    options = {"key": "AKIAFAKE", "secret": "s3cr3t-value"}
    with pytest.raises(StoreUnavailableError) as info:
        GradientIndex.create_or_open(str(blocker / "idx"), FP, storage_options=options)
    with pytest.raises(IndexNotFoundError) as missing:
        GradientIndex.open(str(tmp_path / "none"), storage_options=options)
    idx = GradientIndex.create_or_open(str(tmp_path / "ok"), FP, storage_options=options)
    for text in (str(info.value), str(missing.value), repr(idx), repr(idx.store)):
        assert "AKIAFAKE" not in text and "s3cr3t-value" not in text


def test_commit_accepts_numpy_integers(url):
    store = Store(url)
    rec = ShardRecord("s0", np.int64(0), np.int64(4), np.int64(4), "f", "0", np.int64(1), "a")
    assert commit(store, [rec]) == 1
    assert latest(store)[1]["s0"].end == 4
