"""What the manifest log is made of: a committed shard's record (`ShardRecord`), the state
that versions 1..v add up to (`ManifestState`), where each version and checkpoint lies, and
the bytes of a version. The log itself, its commits and its reading, is
grass_dist.index.manifest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger("grass_dist.index.manifest")

MANIFEST_DIR = "_manifests"
CHECKPOINT_DIR = f"{MANIFEST_DIR}/checkpoints"


@dataclass(frozen=True)
class ShardRecord:
    """One committed shard: training rows [start, end), stored in ``file`` (relative path).

    ``data_sha256`` digests the rows' content (``grass_dist.index.content.shard_digest``);
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

    def to_dict(self) -> dict[str, Any]:
        """The manifest entry (field by field; ``asdict`` is several times slower)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def manifest_path(version: int) -> str:
    """Relative path of manifest ``version`` (a delta, or a cumulative manifest of old)."""
    return f"{MANIFEST_DIR}/{version:010d}.json"


def checkpoint_path(version: int) -> str:
    """Relative path of the checkpoint (whole state) at ``version``."""
    return f"{CHECKPOINT_DIR}/{version:010d}.json"


@dataclass
class ManifestState:
    """The committed state at ``version``.

    ``retired`` holds the files of attempts that a repair replaced (older versions list them,
    so gc keeps them); ``collected`` the files gc removed, which no commit may list.
    """

    version: int = 0
    shards: dict[str, ShardRecord] = field(default_factory=dict)
    retired: set[str] = field(default_factory=set)
    collected: set[str] = field(default_factory=set)

    def apply(self, version: int, doc: dict[str, Any]) -> None:
        """Apply manifest ``version`` (a delta, or a whole state); parse errors change nothing."""
        if "shards" in doc:  # a checkpoint, or a cumulative manifest of an older grass_dist
            self.shards = {sid: ShardRecord.from_dict(r) for sid, r in doc["shards"].items()}
            self.retired = set(doc.get("retired", []))
            self.collected = set(doc.get("collected", []))
        else:
            records = {sid: ShardRecord.from_dict(r) for sid, r in doc["records"].items()}
            collected = list(doc.get("collected", []))
            for sid, rec in records.items():
                old = self.shards.get(sid)
                if old is not None and old.file != rec.file:
                    self.retired.add(old.file)
                self.shards[sid] = rec
            self.collected.update(collected)
        self.version = version

    def files(self) -> set[str]:
        """Every file some manifest version up to this one lists (current and retired)."""
        return {rec.file for rec in self.shards.values()} | self.retired

    def copy(self) -> ManifestState:
        return ManifestState(
            self.version, dict(self.shards), set(self.retired), set(self.collected)
        )


def merge(
    state: ManifestState, records: list[ShardRecord], replace: Mapping[str, str]
) -> tuple[dict[str, ShardRecord], dict[str, str], list[ShardRecord]]:
    """(records to commit, shard_id -> attempt they replace, records whose file gc removed)."""
    delta: dict[str, ShardRecord] = {}
    replaced: dict[str, str] = {}
    gone: list[ShardRecord] = []
    for rec in records:
        kept = delta.get(rec.shard_id) or state.shards.get(rec.shard_id)
        if kept is not None and kept.attempt == rec.attempt:
            continue
        if kept is not None and replace.get(rec.shard_id) != kept.attempt:
            log.info(
                "shard %s already committed (attempt %s); ignoring duplicate attempt %s",
                rec.shard_id,
                kept.attempt,
                rec.attempt,
            )
            continue
        if rec.file in state.collected:
            gone.append(rec)
            continue
        if kept is not None:
            log.info("shard %s: attempt %s replaces %s", rec.shard_id, rec.attempt, kept.attempt)
            replaced[rec.shard_id] = kept.attempt
        delta[rec.shard_id] = rec
    return delta, replaced, gone


def entry_text(shard_id: str, record: dict[str, Any]) -> str:
    """`"shard_id":{record}`, one entry of a checkpoint's `shards` object."""
    return f"{json.dumps(shard_id)}:{json.dumps(record, sort_keys=True, default=_builtin)}"


def json_bytes(doc: dict[str, Any], indent: int | None = None) -> bytes:
    """`doc` as a manifest's JSON (keys sorted); numpy integers (np.int64 starts and ends
    from callers) become plain ints."""
    return json.dumps(doc, indent=indent, sort_keys=True, default=_builtin).encode()


def manifest_doc(
    version: int, delta: Mapping[str, ShardRecord], replaced: dict[str, str], doomed: list[str]
) -> bytes:
    """The bytes of manifest `version`: its new records (by shard id), the shards it
    replaces (repair) and the files it marks collected (gc)."""
    doc: dict[str, Any] = {
        "version": version,
        "records": {sid: rec.to_dict() for sid, rec in sorted(delta.items())},
        "created": datetime.now(timezone.utc).isoformat(),
    }
    if replaced:
        doc["replaced"] = replaced
    if doomed:
        doc["collected"] = doomed
    return json_bytes(doc, indent=1)


def _builtin(value: object) -> object:
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
