"""Exactly-once shard commits through a log of small, create-only manifest versions.

Version ``v`` is ``_manifests/<v:010d>.json``, a delta: the shard records that commit ``v``
added or replaced. The committed state at ``v`` is versions 1..v applied in order. A commit
writes version ``latest + 1`` with a create-only put; losing the race means someone else
committed first, so apply their version and try the next. A shard id is never replaced once
committed: the first committed attempt wins, so retried or duplicated shards add no rows
(repair swaps a bad attempt explicitly, see ``replace``).

Why a commit costs the same at any index size: ``ManifestLog`` keeps the state it last built,
so a commit merges its records into that state, puts only the delta and, after a lost race,
reads only the versions newer than its own. It never lists ``_manifests/`` and never rewrites
committed records. Every ``CHECKPOINT_EVERY`` versions, the committer of that version also
writes ``_manifests/checkpoints/<v:010d>.json`` (the whole state at ``v``) so that opening an
index reads one checkpoint and at most that many deltas, not the whole log.

A reader never sees part of a commit: a version is one object that appears whole, and a
state is always every version up to some ``v``. A manifest written by an older grass_dist is
cumulative (a ``shards`` key, like a checkpoint) and is read as the checkpoint it is.

Garbage collection (``grass_dist.index.gc``) goes through the same log: before it deletes
uncommitted attempt files it commits a version naming them (``collected``). A later commit
refuses those files, and every earlier one is in the state gc checked, so no manifest version
ever lists a deleted file.

The records, the state they add up to and the bytes of a version are
grass_dist.index.manifest_state's.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from grass_dist.errors import (
    CommitConflictError,
    CorruptIndexError,
    ShardCollectedError,
    StoreUnavailableError,
)
from grass_dist.index.manifest_state import (
    CHECKPOINT_DIR,
    MANIFEST_DIR,
    ManifestState,
    ShardRecord,
    checkpoint_path,
    entry_text,
    json_bytes,
    manifest_doc,
    manifest_path,
    merge,
)
from grass_dist.index.store import Store, redact_url

log = logging.getLogger(__name__)

# Opening an index reads at most this many deltas; a checkpoint's cost (the whole state) is
# spread over this many commits.
CHECKPOINT_EVERY = 1000
_NAME = re.compile(r"^(\d{10})\.json$")
_FETCH_BATCH = 32  # versions read concurrently while catching up (S3 round trips overlap)
_GAP_PROBE = 4  # versions looked for past the end of the log when an index is opened


class ManifestLog:
    """One process's view of an index's manifest log, kept current by reading newer versions.

    Thread-safe. Keep one per index and process (``GradientIndex`` does): its cached state is
    what makes commits independent of the index size.
    """

    def __init__(self, store: Store, checkpoint_every: int | None = None) -> None:
        self.store = store
        self.checkpoint_every = checkpoint_every or CHECKPOINT_EVERY
        self._state: ManifestState | None = None
        self._blocked = 0  # the newest version, when it is unreadable (else 0)
        self._warned = 0  # the unreadable version last logged (once, not at every retry)
        # Shard id -> its checkpoint entry ('"id":{...}'): serialising 100k records anew for
        # each checkpoint would cost more than the commits between two checkpoints.
        self._entries: dict[str, str] = {}
        self._lock = threading.Lock()

    def state(self) -> ManifestState:
        """A copy of the newest committed state."""
        with self._lock:
            return self._refresh().copy()

    def snapshot(self) -> tuple[int, dict[str, ShardRecord]]:
        """(version, shard_id -> record) of the newest committed state; (0, {}) if none."""
        with self._lock:
            state = self._refresh()
            return state.version, dict(state.shards)

    def not_kept(self, records: list[ShardRecord]) -> list[str]:
        """Shard ids of `records` committed (as of this log's last commit or read) with
        another attempt: their commit was ignored, another writer's came first."""
        with self._lock:
            shards = self._refresh(catch_up=False).shards
        return [
            r.shard_id
            for r in records
            if r.shard_id in shards and shards[r.shard_id].attempt != r.attempt
        ]

    def commit(
        self,
        records: list[ShardRecord],
        replace: Mapping[str, str] | None = None,
        collect: Iterable[str] = (),
        max_attempts: int = 50,
    ) -> int:
        """Commit ``records`` exactly once; returns the manifest version that includes them.

        Shard ids that are already committed (or repeated in ``records``) keep their first
        committed attempt; later attempts are logged and ignored, unless ``replace`` maps the
        shard id to the attempt committed right now (repair of a bad shard). ``collect``
        (gc only) names uncommitted files about to be deleted; files that some version lists
        are left out. If nothing changes, no manifest is written and the current version is
        returned.

        Raises:
            ShardCollectedError: a record's file was removed by gc; nothing was committed.
            CommitConflictError: still losing create-only races after ``max_attempts`` tries.
            CorruptIndexError: the newest manifest stays unreadable.
            CreateOnlyUnsupportedError: the store lets a create-only put replace an object.
        """
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.store.check_create_only()  # once per Store: the loop below is only safe if it holds
        collect = set(collect)
        with self._lock:
            # No read first: the create-only put finds out whether the kept state is stale.
            state = self._refresh(catch_up=False)
            for attempt in range(max_attempts):
                if self._blocked:
                    # The newest manifest is unreadable: mid-write on a filesystem without
                    # atomic create, or damaged. Building on an older one would drop it.
                    _backoff(attempt)
                    self._catch_up()
                    continue
                delta, replaced, gone = merge(state, records, replace or {})
                if gone:
                    raise ShardCollectedError(_collected_message(self.store, gone))
                doomed = sorted(collect - state.files() - state.collected) if collect else []
                if not delta and not doomed:
                    return state.version
                version = state.version + 1
                data = manifest_doc(version, delta, replaced, doomed)
                if self.store.create_only(manifest_path(version), data):
                    self._apply(version, data)  # exactly what readers parse
                    if version % self.checkpoint_every == 0:
                        self._checkpoint()
                    return version
                _backoff(attempt)  # lost the race: another committer wrote `version` first
                self._catch_up()
        raise self._gave_up(len(records), max_attempts)

    def _gave_up(self, n_records: int, max_attempts: int) -> Exception:
        """Why `commit` gave up after `max_attempts` tries: the newest manifest stayed
        unreadable, or other writers kept committing first."""
        if self._blocked:
            where = self.store.url_of(manifest_path(self._blocked))
            return CorruptIndexError(
                f"manifest {where} is unreadable, so new shards cannot be committed on top of "
                f"it (the newest commit of the index's log, damaged or cut short). Fix: if no "
                f"other job is writing to this index, move that file out of the index's "
                f"_manifests/ folder (keep it elsewhere) and rerun: the state before it is "
                f"intact, and the shards it committed are computed again."
            )
        return CommitConflictError(
            f"could not commit {n_records} shard(s) to {redact_url(self.store.url)} after "
            f"{max_attempts} attempts: other writers kept committing first. Fix: rerun the job "
            "(committed shards are kept), or use fewer concurrent committers (batch commits "
            "in the driver)."
        )

    # ---- reading the log -------------------------------------------------------------
    def _refresh(self, catch_up: bool = True) -> ManifestState:
        if self._state is None:
            self._state, prefetched = _load_base(self.store)
            self._catch_up(prefetched, opening=True)
        elif catch_up:
            self._catch_up()
        return self._state

    def _catch_up(self, prefetched: dict[int, bytes] | None = None, opening: bool = False) -> None:
        """Apply every version after the cached one, up to the first that does not exist
        (where a later one does, the log lost a file: `_check_end`)."""
        state, prefetched = self._state, prefetched or {}
        assert state is not None
        self._blocked, batch = 0, 1
        while True:
            versions = list(range(state.version + 1, state.version + 1 + batch))
            raws = _fetch(self.store, versions, prefetched)
            for i, (version, raw) in enumerate(zip(versions, raws, strict=True)):
                if raw is None:  # the log ends here, unless a later version exists
                    later = [v for v, r in zip(versions[i:], raws[i:], strict=True) if r]
                    later += sorted(v for v in prefetched if v > version)  # listed at opening
                    self._check_end(version, later, probe=opening)
                    return
                try:
                    self._apply(version, raw)
                except (ValueError, KeyError, TypeError) as exc:
                    self._unreadable(version, exc)
                    return
            batch = min(2 * batch, _FETCH_BATCH)

    def _check_end(self, missing: int, later: list[int], probe: bool) -> None:
        """CorruptIndexError when version `missing` does not exist but a later one does:
        versions are created in order, so it existed once and was deleted (by hand, or by a
        lifecycle rule on the bucket), and reading on would silently leave out every shard
        committed after it. `later`: versions seen to exist; with `probe` (a fresh open) a
        few beyond are looked for too. A version created since it was found missing (a
        committer racing this read) is no gap."""
        if not later and probe:  # read concurrently, as catching up reads
            ahead = list(range(missing + 1, missing + 1 + _GAP_PROBE))
            found = _fetch(self.store, ahead, {})
            later = [v for v, raw in zip(ahead, found, strict=True) if raw is not None]
        if not later or self.store.exists(manifest_path(missing)):
            return
        raise CorruptIndexError(
            f"manifest {self.store.url_of(manifest_path(missing))} is missing, but version "
            f"{later[0]} exists: a file of the index's commit log was lost (deleted by hand or "
            "by a lifecycle rule on the bucket), and the shards committed from it on cannot be "
            "read. Fix: restore that file (from a backup, or the bucket's object versions) and "
            "rerun; or rebuild the index under a new store.url."
        )

    def _apply(self, version: int, raw: bytes) -> None:
        assert self._state is not None
        doc = json.loads(raw)
        self._state.apply(version, doc)
        if "shards" in doc:
            self._entries = {}
        else:
            for sid, entry in doc["records"].items():
                self._entries[sid] = entry_text(sid, entry)

    def _unreadable(self, version: int, exc: Exception) -> None:
        where = self.store.url_of(manifest_path(version))
        if self.store.exists(manifest_path(version + 1)):
            raise CorruptIndexError(
                f"manifest {where} is unreadable ({exc}) and newer versions build on it, so the "
                "committed state cannot be read. Fix: restore that file from a backup, or "
                "rebuild the index under a new store.url."
            )
        if self._warned != version:
            log.warning(
                "newest manifest %s is unreadable (%s); reading the state before it", where, exc
            )
        self._blocked = self._warned = version

    def _checkpoint(self) -> None:
        state, entries = self._state, self._entries
        assert state is not None
        for sid, rec in state.shards.items():
            if sid not in entries:  # loaded with the base state, not from a delta
                entries[sid] = entry_text(sid, rec.to_dict())
        rest = {
            "version": state.version,
            "retired": sorted(state.retired),
            "collected": sorted(state.collected),
            "created": datetime.now(timezone.utc).isoformat(),
        }
        shards = ",".join(entries[sid] for sid in state.shards)
        data = b'{"shards":{' + shards.encode() + b"}," + json_bytes(rest)[1:]
        # Create-only: a checkpoint is a pure function of the log, so an existing one is equal.
        try:
            self.store.create_only(checkpoint_path(state.version), data)
        except StoreUnavailableError as exc:
            # The commit itself is durable; without this checkpoint, new readers read the
            # deltas since the previous one (up to the next checkpoint's version).
            log.warning("commit %d kept, its checkpoint not written: %s", state.version, exc)


def latest(store: Store) -> tuple[int, dict[str, ShardRecord]]:
    """Newest committed manifest: (version, shard_id -> record); (0, {}) if none exists.

    Reads from scratch; keep a ``ManifestLog`` (or ``GradientIndex``) to read repeatedly.
    """
    return ManifestLog(store).snapshot()


def commit(
    store: Store,
    records: list[ShardRecord],
    max_attempts: int = 50,
    replace: Mapping[str, str] | None = None,
) -> int:
    """``ManifestLog.commit`` from scratch (one-off commits; a kept log commits faster)."""
    return ManifestLog(store).commit(records, replace, max_attempts=max_attempts)


def legacy_files(store: Store) -> set[str]:
    """Files listed by the cumulative manifests an older grass_dist wrote (versions 1..L).

    They precede every delta, and each may list files that later ones replaced.
    """
    files: set[str] = set()
    first = 1
    while True:
        versions = list(range(first, first + _FETCH_BATCH))
        for raw in _fetch(store, versions, {}):
            try:
                doc = json.loads(raw) if raw is not None else None
            except ValueError:
                continue  # unreadable: the state readers see skips it too
            if not isinstance(doc, dict) or "shards" not in doc:
                return files
            files.update(str(rec["file"]) for rec in doc["shards"].values())
        first += _FETCH_BATCH


def _collected_message(store: Store, gone: list[ShardRecord]) -> str:
    files = ", ".join(store.url_of(rec.file) for rec in gone[:5])
    more = f" and {len(gone) - 5} more" if len(gone) > 5 else ""
    return (
        f"shard file(s) {files}{more} were removed by garbage collection (jobs.gc) before they "
        "were committed, so nothing was committed. Fix: rerun the job (it recomputes every "
        "uncommitted shard), and run jobs.gc with a gc.grace_s longer than a shard's time "
        "from write to commit."
    )


def _load_base(store: Store) -> tuple[ManifestState, dict[int, bytes]]:
    """The state to catch up from, and versions above it already read.

    The newest readable checkpoint; without one, the newest cumulative manifest an older
    grass_dist wrote, or the empty state (then the listing's deltas are already read).
    """
    for version in _listed(store, CHECKPOINT_DIR):
        state = ManifestState()
        try:
            state.apply(version, json.loads(store.read_bytes(checkpoint_path(version))))
            return state, {}
        except (ValueError, KeyError, TypeError) as exc:
            where = store.url_of(checkpoint_path(version))
            log.warning("skipping unreadable checkpoint %s: %s", where, exc)
    fetched: dict[int, bytes] = {}
    listed = _listed(store, MANIFEST_DIR)
    for i in range(0, len(listed), _FETCH_BATCH):
        chunk = listed[i : i + _FETCH_BATCH]
        for version, raw in zip(chunk, _fetch(store, chunk, {}), strict=True):
            if raw is None:
                continue
            try:
                doc = json.loads(raw)
                if isinstance(doc, dict) and "shards" in doc:
                    state = ManifestState()
                    state.apply(version, doc)
                    return state, fetched
            except (ValueError, KeyError, TypeError):
                pass  # catching up reaches it and decides: the newest may be mid-write
            fetched[version] = raw
    return ManifestState(), fetched


def _listed(store: Store, rel_dir: str) -> list[int]:
    """Versions named in ``rel_dir``, newest first."""
    found = (_NAME.match(name) for name in store.list(rel_dir))
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def _fetch(store: Store, versions: list[int], prefetched: dict[int, bytes]) -> list[bytes | None]:
    """Raw manifests ``versions`` (None where absent), read concurrently."""

    def one(version: int) -> bytes | None:
        if version in prefetched:
            return prefetched.pop(version)
        try:
            return store.read_bytes(manifest_path(version))
        except FileNotFoundError:
            return None

    if len(versions) == 1:
        return [one(versions[0])]
    with ThreadPoolExecutor(min(len(versions), 16)) as pool:
        return list(pool.map(one, versions))


def _backoff(attempt: int) -> None:
    # Jittered, growing sleep so N racing committers spread out instead of colliding again.
    time.sleep(random.uniform(0, min(0.002 * (attempt + 1), 0.05)))
