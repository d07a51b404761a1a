"""Delta manifests: a commit writes only its records, checkpoints bound what readers read,
old cumulative indexes open and grow, and a reader racing committers sees whole commits only."""

from __future__ import annotations

import json
import threading
import time

import pytest

from grass_dist.errors import CorruptIndexError, StoreUnavailableError
from grass_dist.index import GradientIndex, ManifestLog, ShardRecord, Store, commit, latest
from grass_dist.index.manifest import checkpoint_path, manifest_path


def _rec(i: int, attempt: str = "a") -> ShardRecord:
    sid = f"s{i:05d}"
    return ShardRecord(sid, i, i + 1, 1, f"shards/{sid}/{attempt}.parquet", "0", 1, attempt)


class Spy:
    """Counts the store operations a piece of code makes, by kind and path."""

    def __init__(self, monkeypatch) -> None:
        self.reads: list[str] = []
        self.lists: list[str] = []
        read, ls = Store.read_bytes, Store.list
        monkeypatch.setattr(
            Store, "read_bytes", lambda s, rel: self.reads.append(rel) or read(s, rel)
        )
        monkeypatch.setattr(Store, "list", lambda s, rel: self.lists.append(rel) or ls(s, rel))


def test_commit_writes_only_its_records_and_never_lists(url, monkeypatch):
    log = ManifestLog(Store(url))
    log.commit([_rec(i) for i in range(200)])
    spy = Spy(monkeypatch)
    assert log.commit([_rec(200)]) == 2
    assert log.commit([_rec(201), _rec(5, "retry")]) == 3  # s00005 stays first-attempt-wins
    assert spy.lists == []  # the kept state gives the next version: no listing
    # Nothing else is read when no one else committed: only each won put, read back to
    # verify that the store kept these bytes (Store.create_only).
    assert spy.reads == [manifest_path(2), manifest_path(3)]
    doc = json.loads(Store(url).read_bytes(manifest_path(3)))
    assert sorted(doc["records"]) == ["s00201"] and "shards" not in doc
    version, records = latest(Store(url))
    assert version == 3 and len(records) == 202 and records["s00005"].attempt == "a"


def test_a_lost_race_reads_only_the_newer_versions(url, monkeypatch):
    mine, other = ManifestLog(Store(url)), ManifestLog(Store(url))
    mine.commit([_rec(i) for i in range(50)])
    other.commit([_rec(50)])
    other.commit([_rec(51)])
    spy = Spy(monkeypatch)
    assert mine.commit([_rec(52)]) == 4
    assert set(spy.reads) <= {manifest_path(v) for v in (2, 3, 4, 5)}
    assert manifest_path(2) in spy.reads and manifest_path(3) in spy.reads
    assert sorted(mine.snapshot()[1]) == [f"s{i:05d}" for i in range(53)]


def test_checkpoints_bound_what_a_new_reader_reads(url, monkeypatch):
    log = ManifestLog(Store(url), checkpoint_every=4)
    for i in range(10):
        log.commit([_rec(i)])
    store = Store(url)
    assert store.list("_manifests/checkpoints") == [f"{v:010d}.json" for v in (4, 8)]
    spy = Spy(monkeypatch)
    version, records = latest(store)
    assert version == 10 and sorted(records) == [f"s{i:05d}" for i in range(10)]
    assert checkpoint_path(8) in spy.reads and manifest_path(9) in spy.reads
    assert not {manifest_path(v) for v in range(1, 9)} & set(spy.reads)
    assert spy.lists == ["_manifests/checkpoints"]
    # A checkpoint is the fold of the deltas before it: without checkpoints, the same state.
    for v in (4, 8):
        store.delete(checkpoint_path(v))
    assert latest(store) == (version, records)


def test_replace_retires_the_bad_file_through_checkpoints(tmp_path):
    store = Store(str(tmp_path / "idx"))
    log = ManifestLog(store, checkpoint_every=3)
    log.commit([_rec(0, "bad"), _rec(1)])
    assert log.commit([_rec(0, "good")], replace={"s00000": "bad"}) == 2
    log.commit([_rec(2)])  # version 3: a checkpoint
    doc = json.loads(store.read_bytes(checkpoint_path(3)))
    assert doc["retired"] == ["shards/s00000/bad.parquet"]
    state = ManifestLog(Store(store.url)).state()
    assert state.shards["s00000"].attempt == "good"
    assert state.retired == {"shards/s00000/bad.parquet"}
    assert "shards/s00000/good.parquet" in state.files()


def _legacy(store: Store, version: int, recs: list[ShardRecord], **extra) -> None:
    """A cumulative manifest as grass_dist wrote them before delta manifests."""
    doc = {"version": version, "shards": {r.shard_id: r.to_dict() for r in recs}, **extra}
    store.write_bytes(manifest_path(version), json.dumps(doc, indent=1).encode())


def test_an_index_with_cumulative_manifests_opens_and_grows(tmp_path):
    url = str(tmp_path / "old")
    index = GradientIndex.create_or_open(url, {"layers": [{"name": "fc", "k": 2}]})
    _legacy(index.store, 1, [_rec(0, "bad"), _rec(1)])
    _legacy(index.store, 2, [_rec(0, "good"), _rec(1)], replaced={"s00000": "bad"})
    _legacy(index.store, 3, [_rec(0, "good"), _rec(1), _rec(2)])
    reopened = GradientIndex.open(url)
    assert sorted(reopened.committed()) == ["s00000", "s00001", "s00002"]
    assert reopened.commit([_rec(3), _rec(1, "dup")]) == 4
    assert "records" in json.loads(index.store.read_bytes(manifest_path(4)))
    version, records = latest(Store(url))
    assert version == 4 and sorted(records) == [f"s{i:05d}" for i in range(4)]
    assert records["s00000"].attempt == "good" and records["s00001"].attempt == "a"


def test_an_unreadable_delta_under_newer_ones_is_an_error(url):
    store = Store(url)
    for i in range(3):
        commit(store, [_rec(i)])
    store.write_bytes(manifest_path(2), b'{"version": 2, "records": ')
    with pytest.raises(CorruptIndexError, match=r"0000000002.json is unreadable .* newer versions"):
        latest(store)


@pytest.mark.parametrize(("lost", "checkpoint_every"), [(3, 1000), (9, 4), (2, 1000)])
def test_a_lost_version_under_newer_ones_is_an_error_not_a_shorter_index(
    url, lost, checkpoint_every
):
    # Versions 1..10, version `lost` deleted: a reader that stopped at the gap would see
    # lost - 1 commits and leave out the shards of every later one, silently. (With a
    # checkpoint every 4 versions, readers start from version 8's: 9 is read, 5 is not.)
    store = Store(url)
    log = ManifestLog(store, checkpoint_every=checkpoint_every)
    for i in range(10):
        log.commit([_rec(i)])
    kept = ManifestLog(store, checkpoint_every=checkpoint_every)
    assert kept.snapshot()[0] == 10
    store.delete(manifest_path(lost))
    said = rf"manifest .*{lost:010d}\.json is missing, but version {lost + 1} exists"
    for reader in (latest, lambda s: ManifestLog(s, checkpoint_every=checkpoint_every).state()):
        with pytest.raises(CorruptIndexError, match=said):
            reader(store)
    with pytest.raises(CorruptIndexError, match=said):  # nor can a commit fill the gap
        ManifestLog(store, checkpoint_every=checkpoint_every).commit([_rec(99)])
    assert not store.exists(manifest_path(lost))
    assert kept.snapshot()[0] == 10  # a reader that had read it keeps its state


def test_a_version_a_checkpoint_covers_is_not_read_again(url):
    store = Store(url)
    log = ManifestLog(store, checkpoint_every=4)
    for i in range(10):
        log.commit([_rec(i)])
    store.delete(manifest_path(5))
    assert latest(store) == log.snapshot()


def test_the_newest_version_lost_leaves_the_state_before_it(url):
    # Nothing newer builds on it: indistinguishable from a commit never made, and no error.
    store = Store(url)
    for i in range(3):
        commit(store, [_rec(i)])
    store.delete(manifest_path(3))
    assert latest(store)[0] == 2


@pytest.mark.parametrize("checkpoint_every", [3, 1000])
def test_readers_racing_a_committer_see_whole_commits_only(url, checkpoint_every):
    # Every commit adds exactly two shards, so a state at version v holds exactly 2v shards
    # (s0..s{2v-1}): anything else is a partial or out-of-order state.
    log = ManifestLog(Store(url), checkpoint_every=checkpoint_every)
    commits, seen, errors = 60, set(), []
    done = threading.Event()

    def committer() -> None:
        try:
            for c in range(commits):
                log.commit([_rec(2 * c), _rec(2 * c + 1)])
                time.sleep(0.002)  # lets the readers in (memory:// commits never release the GIL)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)
        finally:
            done.set()

    kept = ManifestLog(Store(url))  # a long-lived reader catches up; a fresh one loads
    thread = threading.Thread(target=committer)
    thread.start()
    while not done.is_set():
        for version, records in (latest(Store(url)), kept.snapshot()):
            assert sorted(records) == [f"s{i:05d}" for i in range(2 * version)]
            seen.add(version)
    thread.join()
    assert not errors
    assert latest(Store(url))[0] == commits
    assert len(seen) > 3  # the readers did run while the committer was committing


def test_a_checkpoint_that_cannot_be_written_keeps_the_commit(tmp_path, monkeypatch, caplog):
    store = Store(str(tmp_path / "idx"))
    original = Store.create_only

    def no_checkpoints(self, rel, data):
        if rel.startswith("_manifests/checkpoints/"):
            raise StoreUnavailableError(self.url, "disk full")
        return original(self, rel, data)

    monkeypatch.setattr(Store, "create_only", no_checkpoints)
    log = ManifestLog(store, checkpoint_every=2)
    assert [log.commit([_rec(i)]) for i in range(3)] == [1, 2, 3]
    assert "commit 2 kept, its checkpoint not written" in caplog.text
    assert latest(Store(store.url)) == log.snapshot()
