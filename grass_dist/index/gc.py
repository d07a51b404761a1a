"""Garbage collection: remove shard attempt files that no manifest version lists.

Every killed, retried or duplicated shard attempt leaves its Parquet file under
``shards/<shard id>/``. ``collect`` removes those that no manifest version lists and whose
modification time (the store's clock) is older than ``grace_s``, and reports the bytes
reclaimed. Files replaced by a repair stay: older manifest versions list them.

Guarantee: a file that some manifest version lists, or ever will, is never removed, even
while writers commit. gc lists ``shards/`` and only then reads the manifest state, so every
file committed before the listing counts as committed. Before deleting anything, it commits
a manifest version naming the files (``collected``) with the same create-only put as shard
commits, leaving out whatever a version up to that one lists (re-checked after every lost
race). Every commit after it refuses records whose file is collected
(``ShardCollectedError``, nothing committed), so no later version lists them either; only
then are the files deleted. The grace period is what keeps gc from failing the commit of an
attempt that is written but not yet committed; with too short a grace that commit fails
loudly and the shard is recomputed, it never points at a missing file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from grass_dist.index.manifest import ManifestLog, legacy_files
from grass_dist.index.shards import SHARDS_DIR
from grass_dist.index.store import Store
from grass_dist.urls import redact_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcReport:
    """What one gc run found and removed (files are shard attempt files)."""

    url: str  # the store (credentials removed)
    listed: int  # attempt files under shards/
    committed: int  # listed files that some manifest version lists: kept
    young: int  # uncommitted, but modified less than grace_s ago: kept
    removed: int  # uncommitted and older: removed (dry run: would be removed)
    bytes_reclaimed: int  # their sizes (dry run: would be reclaimed)
    collected_in_version: int | None  # the manifest version gc wrote naming the removed files
    # (None: gc wrote none: nothing to remove, or a dry run)
    grace_s: float
    dry_run: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def unchanged_for(modified: float | None, now: float, grace_s: float) -> bool:
    """Whether an object last modified at `modified` (None: unknown, kept) has been left
    alone for `grace_s` seconds by `now`: the test of everything gc may remove."""
    return modified is not None and now - modified >= grace_s


def _is_attempt(rel: str) -> bool:
    parts = rel.split("/")
    return len(parts) == 3 and parts[0] == SHARDS_DIR and parts[2].endswith(".parquet")


def collect(
    store: Store, grace_s: float = 3600.0, dry_run: bool = False, now: float | None = None
) -> GcReport:
    """Remove attempt files no manifest version lists, modified at least ``grace_s`` ago.

    Args:
        grace_s: seconds; keep an uncommitted file younger than this (a writer may be about
            to commit it). ``now`` (seconds since the epoch) defaults to this machine's clock.
        dry_run: report what would be removed; write and delete nothing.
    """
    if grace_s < 0:
        raise ValueError(f"grace_s must be >= 0 seconds, got {grace_s}")
    files = {rel: info for rel, info in store.walk(SHARDS_DIR).items() if _is_attempt(rel)}
    manifests = ManifestLog(store)  # read after listing: see the module docstring
    keep = manifests.state().files() | legacy_files(store)
    now = time.time() if now is None else now
    candidates: dict[str, int] = {}
    young = 0
    for rel, (size, modified) in files.items():
        if rel in keep:
            continue
        if not unchanged_for(modified, now, grace_s):
            young += 1
        else:
            candidates[rel] = size
    version = None
    for rel in sorted(candidates) if dry_run else ():
        log.info("would remove uncommitted attempt file %s (gc.dry_run)", store.url_of(rel))
    if candidates and not dry_run:
        version = manifests.commit([], collect=candidates)
        collected = manifests.state().collected
        for rel in sorted(candidates):
            if rel not in collected:  # committed meanwhile: the collecting commit left it out
                del candidates[rel]
                continue
            store.delete(rel)
            log.info("removed uncommitted attempt file %s", store.url_of(rel))
    return GcReport(
        url=redact_url(store.url),
        listed=len(files),
        committed=len(files) - young - len(candidates),
        young=young,
        removed=len(candidates),
        bytes_reclaimed=sum(candidates.values()),
        collected_in_version=version,
        grace_s=grace_s,
        dry_run=dry_run,
    )
