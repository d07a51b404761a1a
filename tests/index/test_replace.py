"""Repair commits: ``replace`` is a compare-and-swap on the bad attempt; normal commits keep
"first attempt wins"; ``check_shard`` names what is wrong with a committed shard."""

from __future__ import annotations

import json

import numpy as np

from grass_dist.index import GradientIndex, ShardRecord, Store, commit, latest
from grass_dist.index.manifest import manifest_path


def _rec(shard_id: str, attempt: str) -> ShardRecord:
    return ShardRecord(shard_id, 0, 1, 1, f"shards/{shard_id}/{attempt}", "0", 1, attempt)


def test_replace_swaps_only_the_named_bad_attempt(tmp_path):
    store = Store(str(tmp_path / "idx"))
    assert commit(store, [_rec("s0", "bad"), _rec("s1", "a")]) == 1
    assert commit(store, [_rec("s0", "other")]) == 1  # a normal commit never replaces
    # Repair: swap "bad" for "good" (recorded in the manifest).
    assert commit(store, [_rec("s0", "good")], replace={"s0": "bad"}) == 2
    doc = json.loads(store.read_bytes(manifest_path(2)))
    assert doc["replaced"] == {"s0": "bad"}
    # A second, late repair of the same bad attempt loses: "good" is committed now.
    assert commit(store, [_rec("s0", "late")], replace={"s0": "bad"}) == 2
    # Replacing a shard that is not committed yet is an ordinary first commit.
    assert commit(store, [_rec("s2", "x")], replace={"s2": "whatever"}) == 3
    version, records = latest(store)
    assert version == 3
    assert {sid: r.attempt for sid, r in records.items()} == {"s0": "good", "s1": "a", "s2": "x"}
    assert "replaced" not in json.loads(store.read_bytes(manifest_path(3)))


def test_check_shard_names_missing_truncated_and_altered_files(tmp_path):
    index = GradientIndex.create_or_open(
        str(tmp_path / "idx"), {"layers": [{"name": "fc", "k": 2}]}
    )
    records = []
    for i in range(4):
        rows = np.arange(3 * i, 3 * i + 3)
        phi = {"fc": np.full((3, 2), float(i), np.float32)}
        records.append(index.write_shard(f"s{i}", rows[0], rows[-1] + 1, rows, list("abc"), phi))
    index.commit(records)
    fine, missing, truncated, altered = records
    index.store.delete(missing.file)
    raw = index.store.read_bytes(truncated.file)
    index.store.write_bytes(truncated.file, raw[:-10])
    raw = bytearray(index.store.read_bytes(altered.file))
    raw[len(raw) // 3] ^= 1
    index.store.write_bytes(altered.file, bytes(raw))
    assert index.check_shard(fine) is None
    for record, what in ((missing, "missing"), (truncated, "sha256"), (altered, "sha256")):
        problem = index.check_shard(record)
        assert record.file in problem and what in problem and "Fix:" not in problem
