"""Files of an index damaged at rest, met through the Python API as a user meets them: a
shard is named with the API's repair (and that repair works), a damaged preconditioner is
built again rather than read as another H, and a damaged result file is named with the
call that writes it again. Every repair gives back the scores of the undamaged index."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import grass_dist as gd
from grass_dist.errors import CorruptResultsError, CorruptShardError

pytestmark = pytest.mark.integration


def _sets() -> tuple[torch.nn.Module, TensorDataset, TensorDataset]:
    torch.manual_seed(0)
    x, y = torch.rand(60, 6), torch.arange(60) % 3
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    return model, TensorDataset(x[:48], y[:48]), TensorDataset(x[48:], y[48:])


def _zero(path: Path, nbytes: int = 40) -> None:
    """The last `nbytes` of a file overwritten with zeros, its size kept."""
    data = bytearray(path.read_bytes())
    data[-nbytes:] = bytes(nbytes)
    path.write_bytes(bytes(data))


def test_damaged_files_are_named_with_the_api_call_that_mends_them(ray_session, tmp_path, caplog):
    model, train, query = _sets()
    store = tmp_path / "index"
    settings = {"store": str(store), "workers": 1, "k": 8}
    shards = ["index.shard_size=16", f"run.output_dir={tmp_path}"]
    index = gd.Index.build(model, train, **settings, overrides=shards)
    want = index.attribute(query, dense=True).dense()

    # A shard: named, with the API's way to recompute it, which recomputes that one alone.
    last = max(index.gradient_index.committed().values(), key=lambda r: r.start)
    _zero(store / last.file)
    published = sorted((store / "results" / "default").iterdir())
    with pytest.raises(CorruptShardError) as refused:
        index.attribute(query, dense=True)
    # The refused run removed the parts it had written of the shards before (they waited
    # for jobs.gc).
    assert sorted((store / "results" / "default").iterdir()) == published
    said = str(refused.value)
    assert f"shard file {store / last.file} is corrupt" in said
    assert "the same Index.build call with overrides=['index.repair=true']" in said
    mended = gd.Index.build(model, train, **settings, overrides=[*shards, "index.repair=true"])
    assert list(mended.summary["repair"]["bad_shards"]) == [last.shard_id]
    assert mended.summary["index"]["computed_shards"] == 0
    np.testing.assert_array_equal(mended.attribute(query, dense=True).dense(), want)

    # The stored preconditioner: reused without a pass over the index, so a damaged one
    # must not be read as another H. The next session's call builds it again, saying so.
    _zero(store / "preconditioner" / "fisher.safetensors")
    mended.close()
    reopened = gd.Index.build(model, train, **settings, overrides=shards)
    with caplog.at_level(logging.WARNING):
        rebuilt = reopened.attribute(query, dense=True)
    assert "fisher.safetensors is damaged" in caplog.text
    assert rebuilt.summary["precondition"]["reused"] is False
    np.testing.assert_array_equal(rebuilt.dense(), want)

    # A result file: named, with the call that writes the result set again.
    (part, *_), topk = sorted(store.glob("results/default/*/dense/*.parquet")), None
    _zero(part, 64)
    with pytest.raises(CorruptResultsError) as refused:
        rebuilt.dense()
    said = str(refused.value)
    assert said.startswith(f"result file {part} of results 'default' is damaged or gone")
    assert "the same Python API attribute call (name='default')" in said
    (topk,) = store.glob("results/default/*/topk.parquet")
    topk.write_bytes(topk.read_bytes()[:-100])
    with pytest.raises(CorruptResultsError, match=r"topk\.parquet of results 'default'"):
        rebuilt.topk()
    again = reopened.attribute(query, dense=True)
    np.testing.assert_array_equal(again.dense(), want)
    assert len(again.topk()) == len(query) * 2 * 10
