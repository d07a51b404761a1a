"""Exactly-once shard commits through cumulative, create-only manifest versions.

``_manifests/<version:010d>.json`` holds every committed shard as of that version. A commit
writes version ``latest + 1`` with a create-only put; losing the race means someone else
committed first, so re-read and try the next version. A shard id is never replaced once
committed: the first committed attempt wins, so retried or duplicated shards add no rows.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from grass_dist.errors import CommitConflictError, CorruptIndexError
from grass_dist.index.store import Store, redact_url

log = logging.getLogger(__name__)

MANIFEST_DIR = "_manifests"
_NAME = re.compile(r"^(\d{10})\.json$")


@dataclass(frozen=True)
class ShardRecord:
    """One committed shard: training rows [start, end), stored in ``file`` (relative path).

    ``data_sha256`` digests the rows' content (``grass_dist.data.content.shard_digest``);
    "" for shards written before content digests.
    """

    shard_id: str
    start: int
    end: int
    rows: int
    file: str
    sha256: str
    nbytes: int
    attempt: str
    data_sha256: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ShardRecord:
        """Build from a manifest entry (extra keys from newer writers are ignored, fields
        newer than the writer take their defaults)."""
        fields = cls.__dataclass_fields__
        return cls(**{name: d[name] for name in fields if name in d})  # type: ignore[arg-type]


def manifest_path(version: int) -> str:
    """Relative path of manifest ``version``."""
    return f"{MANIFEST_DIR}/{version:010d}.json"


def _listed_versions(store: Store) -> list[int]:
    """Manifest versions present, newest first (listing cache invalidated by Store.list)."""
    found = (_NAME.match(name) for name in store.list(MANIFEST_DIR))
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def _read(store: Store, version: int) -> dict[str, ShardRecord]:
    doc = json.loads(store.read_bytes(manifest_path(version)))
    return {sid: ShardRecord.from_dict(rec) for sid, rec in doc["shards"].items()}


def _latest(store: Store) -> tuple[int, dict[str, ShardRecord], int]:
    """(newest parsable version, its records, newest listed version)."""
    listed = _listed_versions(store)
    for version in listed:
        try:
            return version, _read(store, version), listed[0]
        except (ValueError, KeyError, TypeError) as exc:
            where = store.url_of(manifest_path(version))
            log.warning("skipping unreadable manifest %s: %s", where, exc)
    return 0, {}, listed[0] if listed else 0


def latest(store: Store) -> tuple[int, dict[str, ShardRecord]]:
    """Newest committed manifest: (version, shard_id -> record); (0, {}) if none exists."""
    version, records, _ = _latest(store)
    return version, records


def _merge(
    current: dict[str, ShardRecord], records: list[ShardRecord], replace: Mapping[str, str]
) -> tuple[dict[str, ShardRecord], dict[str, str], bool]:
    """(merged records, shard_id -> replaced attempt, whether anything changed)."""
    merged, replaced, changed = dict(current), {}, False
    for rec in records:
        kept = merged.get(rec.shard_id)
        if kept is None:
            merged[rec.shard_id], changed = rec, True
        elif kept.attempt == rec.attempt:
            continue
        elif replace.get(rec.shard_id) == kept.attempt:
            log.info("shard %s: attempt %s replaces %s", rec.shard_id, rec.attempt, kept.attempt)
            merged[rec.shard_id], changed = rec, True
            replaced[rec.shard_id] = kept.attempt
        else:
            log.info(
                "shard %s already committed (attempt %s); ignoring duplicate attempt %s",
                rec.shard_id,
                kept.attempt,
                rec.attempt,
            )
    return merged, replaced, changed


def commit(
    store: Store,
    records: list[ShardRecord],
    max_attempts: int = 50,
    replace: Mapping[str, str] | None = None,
) -> int:
    """Commit ``records`` exactly once; returns the manifest version that includes them.

    Shard ids that are already committed (or repeated in ``records``) keep their first
    committed attempt; later attempts are logged and ignored, unless ``replace`` maps the
    shard id to the attempt committed right now (repair of a bad shard). If nothing changes,
    no manifest is written and the current version is returned.

    Raises:
        CommitConflictError: still losing create-only races after ``max_attempts`` tries.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    for attempt in range(max_attempts):
        version, current, newest = _latest(store)
        if newest > version:
            # The newest manifest is unreadable: mid-write on a filesystem without atomic
            # create, or damaged. Building on an older one would drop its shards, so wait.
            _backoff(attempt)
            continue
        merged, replaced, changed = _merge(current, records, replace or {})
        if not changed:
            return version
        doc = {
            "version": version + 1,
            "shards": {sid: asdict(rec) for sid, rec in sorted(merged.items())},
            "created": datetime.now(timezone.utc).isoformat(),
        }
        if replaced:
            doc["replaced"] = replaced
        # default=: numpy integers (np.int64 starts/ends from callers) become plain ints.
        data = json.dumps(doc, indent=1, sort_keys=True, default=_builtin).encode()
        if store.create_only(manifest_path(version + 1), data):
            return version + 1
        _backoff(attempt)  # lost the race: another committer wrote version + 1 first
    if newest > version:
        raise CorruptIndexError(
            f"manifest {store.url_of(manifest_path(newest))} is unreadable, so new shards "
            "cannot be committed on top of it. Fix: inspect or remove that file (older "
            "manifest versions still hold every shard committed before it), then rerun."
        )
    raise CommitConflictError(
        f"could not commit {len(records)} shard(s) to {redact_url(store.url)} after {max_attempts} "
        "attempts: other writers kept committing first. Fix: rerun the job (committed shards "
        "are kept), or use fewer concurrent committers (batch commits in the driver)."
    )


def _backoff(attempt: int) -> None:
    # Jittered, growing sleep so N racing committers spread out instead of colliding again.
    time.sleep(random.uniform(0, min(0.002 * (attempt + 1), 0.05)))


def _builtin(value: object) -> object:
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
