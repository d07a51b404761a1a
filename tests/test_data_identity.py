"""Data identity: an index can grow with data.train, but never take rows of another dataset."""

from __future__ import annotations

import numpy as np
import pytest

from grass_dist.data import digits
from grass_dist.data_identity import check_committed_rows, data_identity
from grass_dist.errors import DataMismatchError
from grass_dist.index import GradientIndex

NODE = {"_target_": "grass_dist.data.digits", "split": "train", "n_train": 90, "n_query": 12}


def test_identity_drops_only_declared_size_arguments():
    small = data_identity({**NODE, "seed": 0}, digits("train", 90, 12))
    grown = data_identity({**NODE, "n_train": 120, "seed": 0}, digits("train", 120, 12))
    assert small == grown == {"_target_": NODE["_target_"], "split": "train", "seed": 0}
    assert data_identity({**NODE, "seed": 1}, digits("train", 90, 12)) != small
    query = digits("query", 90, 12)  # its rows move with n_train: nothing is a size argument
    assert data_identity({**NODE, "split": "query"}, query) == {**NODE, "split": "query"}
    # Growing n_train only appends rows to the training split.
    assert digits("train", 120, 12).keys[:90] == digits("train", 90, 12).keys


class Rows:
    """A dataset of ``n`` rows with keys ``k<i>``, except ``changed`` rows."""

    def __init__(self, n: int, changed: dict[int, str] | None = None) -> None:
        self.keys = [(changed or {}).get(i, f"k{i}") for i in range(n)]

    def __len__(self) -> int:
        return len(self.keys)


def _index(tmp_path, n: int, shard: int) -> GradientIndex:
    index = GradientIndex.create_or_open(
        str(tmp_path / "idx"), {"layers": [{"name": "fc", "k": 1}]}
    )
    for lo in range(0, n, shard):
        rows = np.arange(lo, min(lo + shard, n))
        phi = {"fc": np.zeros((len(rows), 1), np.float32)}
        keys = [f"k{i}" for i in rows]
        index.commit([index.write_shard(f"s{lo:03d}", lo, rows[-1] + 1, rows, keys, phi)])
    return index


def test_committed_rows_allow_growth_and_refuse_shrinking_or_other_keys(tmp_path):
    index = _index(tmp_path, 50, 10)
    check_committed_rows(index, Rows(50))
    check_committed_rows(index, Rows(80))  # growth
    with pytest.raises(DataMismatchError, match="up to 49.*only 40 rows"):
        check_committed_rows(index, Rows(40))
    # Rows 0-9, 20-29 and 40-49 are sampled (first, middle, last shard).
    with pytest.raises(DataMismatchError, match="row 45 has key 'k45' in the index .* but 'x'"):
        check_committed_rows(index, Rows(60, {45: "x"}))
    check_committed_rows(index, Rows(60, {15: "x"}), shards=3)  # unsampled shard: not read
    with pytest.raises(DataMismatchError, match="row 15"):
        check_committed_rows(index, Rows(60, {15: "x"}), shards=5)


def test_unreadable_sampled_shard_is_skipped(tmp_path):
    index = _index(tmp_path, 30, 10)
    first = min(index.committed().values(), key=lambda r: r.start)
    index.store.write_bytes(first.file, b"not parquet")
    check_committed_rows(index, Rows(30, {5: "x"}))  # repair will report it instead
    with pytest.raises(DataMismatchError, match="row 25"):
        check_committed_rows(index, Rows(30, {25: "x"}))
