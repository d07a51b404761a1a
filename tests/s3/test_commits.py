"""Commits that hold on any store: one that ignores create-only mode is refused before a
shard could be lost, and two drivers building one index at once both finish, with every row
once and the learned state that index.json names."""

from __future__ import annotations

import hashlib
import multiprocessing as mp

import numpy as np
import pytest

from grass_dist import assembly, pipeline, run
from grass_dist.errors import CreateOnlyUnsupportedError, FingerprintMismatchError
from grass_dist.gradients import learned_state
from grass_dist.index import GradientIndex, Store
from grass_dist.index.manifest import latest
from tests.s3 import committer, driver, lax_fs
from tests.s3.conftest import Backend
from tests.test_end_to_end_compressors import SELECTIVE

pytestmark = pytest.mark.integration

FINGERPRINT = {"layers": [{"name": committer.LAYER, "k": committer.K}]}


def test_store_that_ignores_create_only_is_refused_before_a_shard_is_lost(backend, tmp_path, capfd):
    url, options = lax_fs.wrap(backend.url, backend.storage_options)
    lax = Store(url, options)
    for data in (b"first", b"second"):  # the wrapper does overwrite a create-only put
        lax.fs.pipe_file(lax._path("overwritten"), data, mode="create")
    assert lax.read_bytes("overwritten") == b"second"

    with pytest.raises(CreateOnlyUnsupportedError, match="If-None-Match"):
        GradientIndex.create_or_open(url, FINGERPRINT, options)
    assert not lax.exists("index.json")

    # The race suite through the wrapper, on an index created on the real store: every
    # committer refuses at its first commit, so no manifest exists whose shards could be lost.
    GradientIndex.create_or_open(backend.url, FINGERPRINT, backend.storage_options)
    exitcodes, lost = committer.race(url, options, procs=3, per_proc=1)
    assert all(code != 0 for code in exitcodes) and lost == 0
    assert capfd.readouterr().err.count("CreateOnlyUnsupportedError") >= 3
    assert latest(lax) == (0, {})

    # The job refuses up front too: before any mask is fitted or shard computed.
    lax_job = Backend("lax", url, options)
    with pytest.raises(SystemExit) as refused:
        run.index(lax_job.cfg(tmp_path, *SELECTIVE))
    assert refused.value.code == 2
    message = capfd.readouterr().err
    assert "does not enforce create-only writes" in message and "Fix:" in message
    assert not lax.exists("compressors") and latest(lax) == (0, {})
    for secret in backend.storage_options.values():
        assert not isinstance(secret, str) or len(secret) < 8 or secret not in message


def _named_states(index: GradientIndex) -> dict[str, str]:
    """Learned layer -> the state file index.json names (its sha256 checked on load)."""
    learned = [d["name"] for d in index.fingerprint["layers"] if "state_sha256" in d]
    states = learned_state.load_states(index, learned)
    assert learned and set(states) == set(learned)
    return {
        n: learned_state.state_path(n, hashlib.sha256(s).hexdigest()) for n, s in states.items()
    }


def test_two_driver_processes_build_one_index_at_once(backend, tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    drivers = [
        ctx.Process(
            target=driver.build_index,
            args=(
                str(tmp_path / f"driver{i}"),
                backend.url,
                backend.storage_options,
                SELECTIVE,
                barrier,
            ),
        )
        for i in range(2)
    ]
    for d in drivers:
        d.start()
    for d in drivers:
        d.join(300)
    assert [d.exitcode for d in drivers] == [0, 0]

    index = GradientIndex.open(backend.url, backend.storage_options)
    rows = np.concatenate([data.row_ids for _, data in index.iter_committed()])
    assert rows.tolist() == list(range(90))  # every row exactly once
    named = _named_states(index)
    assert sorted(
        f"{learned_state.STATE_DIR}/{n}" for n in index.store.list("compressors")
    ) == sorted(named.values())


def test_driver_with_another_fit_cannot_replace_the_stored_state(backend, tmp_path, monkeypatch):
    first = pipeline.prepare(backend.cfg(tmp_path, *SELECTIVE))
    named = _named_states(first.index)
    # A second driver that looked for the index before the first one created it fits its
    # own masks (on other sampled rows: other bytes) and stores them, never over the first's.
    monkeypatch.setattr(assembly, "existing_index", lambda job: None)
    with pytest.raises(FingerprintMismatchError, match="state_sha256"):
        pipeline.prepare(backend.cfg(tmp_path, *SELECTIVE, "compression.selective.seed=1"))
    index = GradientIndex.open(backend.url, backend.storage_options)
    assert _named_states(index) == named
    assert len(index.store.list(learned_state.STATE_DIR)) > len(named)  # both fits stored
