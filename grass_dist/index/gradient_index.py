"""The durable gradient index: fingerprint, immutable shard files and committed manifests.

Layout under the index URL (README.md, "Results: layout and schema", lists every path)::

    index.json                          {"format_version": 1, "fingerprint": {...}}, written once
    _manifests/<version:010d>.json      one commit's records (a delta), create-only
    _manifests/checkpoints/<version:010d>.json   the whole state every CHECKPOINT_EVERY versions
    shards/<shard id>/<attempt>.parquet immutable, one per attempt
    preconditioner/..., results/...     artifacts (`put_artifact` / `get_artifact`)
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from grass_dist.errors import (
    CorruptIndexError,
    CorruptShardError,
    FingerprintMismatchError,
    IndexNotFoundError,
    StoreUnavailableError,
)
from grass_dist.index import manifest, shards
from grass_dist.index.content import shard_digest
from grass_dist.index.fingerprint import canonical, check_fingerprint, show
from grass_dist.index.manifest import ManifestLog, ShardRecord
from grass_dist.index.retry import RetryPolicy
from grass_dist.index.shards import ShardData
from grass_dist.index.store import Store

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
FORMAT_VERSION = 1
_RESERVED_DIRS = (f"{manifest.MANIFEST_DIR}/", f"{shards.SHARDS_DIR}/")
_SHARD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class GradientIndex:
    """Handle on one gradient index; cheap to pickle (ships url, options and fingerprint).

    Use :meth:`create_or_open` (writers) or :meth:`open` (readers) rather than the constructor.
    """

    def __init__(self, store: Store, fingerprint: dict[str, Any]) -> None:
        self.store = store
        self.fingerprint = fingerprint
        self._manifests: ManifestLog | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (GradientIndex, (self.store, self.fingerprint))

    def __repr__(self) -> str:
        return f"GradientIndex({self.store.url_of('')!r})"

    # ---- opening -----------------------------------------------------------------------
    @classmethod
    def create_or_open(
        cls,
        url: str,
        fingerprint: dict[str, Any],
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> GradientIndex:
        """Open the index at ``url``, creating it with ``fingerprint`` if absent.

        Raises:
            FingerprintMismatchError: the existing index has a different fingerprint.
            CreateOnlyUnsupportedError: the store does not enforce create-only puts, on
                which index.json and every manifest commit rely.
        """
        store = Store(url, storage_options, retry)
        store.check_create_only()
        requested = canonical(fingerprint)
        doc = json.dumps(
            {"format_version": FORMAT_VERSION, "fingerprint": requested}, indent=1, sort_keys=True
        ).encode()
        for _ in range(5):
            absent = not store.exists(INDEX_FILE) and not _lost_index_file(store)
            if absent and store.create_only(INDEX_FILE, doc):
                log.info("created gradient index at %s", store.url_of(""))
                return cls(store, requested)
            try:
                stored = _read_index(store)
            except FileNotFoundError:  # a racing creator's conditional put failed after all
                continue
            check_fingerprint(store, stored, requested)
            return cls(store, stored)
        raise StoreUnavailableError(store.url_of(""), f"{INDEX_FILE} keeps appearing and vanishing")

    @classmethod
    def open(
        cls,
        url: str,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> GradientIndex:
        """Open an existing index. Raises IndexNotFoundError if there is none at ``url``."""
        store = Store(url, storage_options, retry)
        try:
            return cls(store, _read_index(store))
        except FileNotFoundError as exc:
            if store.exists(f"ckpt_0/{INDEX_FILE}"):
                raise IndexNotFoundError(
                    f"{store.url_of('')} is an ensemble's folder, not an index: its members' "
                    f"indexes are {store.url_of('ckpt_0')} and on (ckpt_<c>). Read its averaged "
                    f"results with grass_dist.scoring.results by the URL: load_table(url, "
                    f"run_name, 'topk') or load_dense(url, run_name)"
                ) from exc
            raise IndexNotFoundError(
                f"no gradient index at {store.url_of('')} ({INDEX_FILE} not found). Fix: run "
                "`python -m jobs.index` with the same store.url (or index.url) first, or point "
                "store.url at an existing index."
            ) from exc

    # ---- fingerprint-derived facts -----------------------------------------------------
    @property
    def url(self) -> str:
        """The store URL (may name a local path; has no credentials if none were in it)."""
        return self.store.url

    @property
    def layers(self) -> list[tuple[str, int]]:
        """(layer name, k_l) in column order, from ``fingerprint["layers"]``."""
        return [(str(d["name"]), int(d["k"])) for d in self.fingerprint.get("layers", [])]

    @property
    def dtype(self) -> str:
        """Storage dtype of the gradients: float32 (default), float16 or bfloat16."""
        return str(self.fingerprint.get("dtype", "float32"))

    # ---- shards and commits ------------------------------------------------------------
    @property
    def manifests(self) -> ManifestLog:
        """This process's view of the manifest log (made on first use, never pickled)."""
        if self._manifests is None:
            self._manifests = ManifestLog(self.store)
        return self._manifests

    def committed(self) -> dict[str, ShardRecord]:
        """shard_id -> record for every shard in the latest manifest version."""
        return self.manifests.snapshot()[1]

    def num_rows(self) -> int:
        """Total committed training rows."""
        return sum(rec.rows for rec in self.committed().values())

    def write_shard(
        self,
        shard_id: str,
        start: int,
        end: int,
        row_ids: np.ndarray,
        keys: list[str],
        phi: dict[str, np.ndarray],
        digests: np.ndarray | None = None,
    ) -> ShardRecord:
        """Write one shard attempt to a fresh file; the caller commits the returned record.

        Args:
            shard_id: stable id of training rows [start, end), e.g. ``"000042"``.
            row_ids: int64, shape (n,). keys: n sample keys.
            phi: layer name -> array (n, k_l); must match ``self.layers`` exactly.
            digests: uint8 (n, 32), the rows' content digests (``grass_dist.index.content``);
                stored per row, and over the shard in the record's ``data_sha256``.
        """
        if not _SHARD_ID.match(shard_id):
            raise ValueError(f"shard_id must match {_SHARD_ID.pattern}, got {shard_id!r}")
        want = dict(self.layers)
        got = {name: int(np.shape(x)[-1]) for name, x in phi.items()}
        if got != want:
            raise FingerprintMismatchError(
                f"shard {shard_id} has layers {show(got, 200)} but the index at "
                f"{self.store.url_of('')} expects {show(want, 200)}. Fix: use the same "
                "model/compression settings as the index, or a new store.url."
            )
        attempt = uuid.uuid4().hex  # unique per attempt: files are never overwritten
        rel = f"{shards.SHARDS_DIR}/{shard_id}/{attempt}.parquet"
        ordered = {name: phi[name] for name, _ in self.layers}
        nbytes, sha = shards.write_shard(
            self.store, rel, row_ids, keys, ordered, self.dtype, digests
        )
        return ShardRecord(
            shard_id=shard_id,
            start=int(start),
            end=int(end),
            rows=int(np.shape(row_ids)[0]),
            file=rel,
            sha256=sha,
            nbytes=nbytes,
            attempt=attempt,
            data_sha256="" if digests is None else shard_digest(digests),
        )

    def commit(self, records: list[ShardRecord], replace: dict[str, str] | None = None) -> int:
        """Commit shard records exactly once (first committed attempt wins); returns version.

        ``replace`` (repair only) maps a shard id to the bad attempt its new record replaces;
        see ``ManifestLog.commit``.
        """
        return self.manifests.commit(list(records), replace=replace)

    def not_kept(self, records: list[ShardRecord]) -> list[str]:
        """Shard ids of `records`, just committed, whose commit was ignored: another
        attempt (another writer's) was committed first (`ManifestLog.not_kept`)."""
        return self.manifests.not_kept(records)

    def unsound_files(self) -> list[str]:
        """A line for each committed shard whose file is gone or not of its committed size
        (deleted, cut short): one listing of ``shards/``, no file read."""
        listed = self.store.walk(shards.SHARDS_DIR)
        said = []
        for rec in sorted(self.committed().values(), key=lambda r: (r.start, r.shard_id)):
            size = listed.get(rec.file, (None,))[0]
            if size != rec.nbytes:
                found = "missing" if size is None else f"{size} bytes, not {rec.nbytes}"
                said.append(f"shard {rec.shard_id} ({self.store.url_of(rec.file)}: {found})")
        return said

    def check_shard(self, record: ShardRecord) -> str | None:
        """Why a committed shard is bad (missing, altered, truncated, wrong rows), or None.

        The text names the file and the problem, without the error's advice to repair.
        """
        try:
            self.read(record, verify=True)
        except CorruptShardError as exc:
            return str(exc).partition(" Fix:")[0]
        return None

    def read(
        self, record: ShardRecord, layers: list[str] | None = None, verify: bool = True
    ) -> ShardData:
        """Read a committed shard, checking its sha256 (if ``verify``), and that it holds
        the record's rows, ``start`` .. ``end - 1`` in order: a manifest that names another
        shard's file (edited, or restored from elsewhere) would add its rows twice."""
        data = shards.read_shard(self.store, record.file, layers, record.sha256 if verify else None)
        if len(data) != record.rows:
            raise CorruptShardError(
                f"shard file {self.store.url_of(record.file)} has {len(data)} rows, the "
                f"manifest says {record.rows}. {shards.repair_fix(self.store)}"
            )
        rows = np.asarray(data.row_ids)
        if rows.size and (rows[0] != record.start or not np.array_equal(rows, _span(record))):
            raise CorruptShardError(
                f"shard file {self.store.url_of(record.file)} holds rows {rows[0]}..{rows[-1]}, "
                f"not shard {record.shard_id}'s rows {record.start}..{record.end - 1} (its "
                f"manifest entry names another shard's file?). {shards.repair_fix(self.store)}"
            )
        return data

    def iter_committed(
        self, layers: list[str] | None = None, verify: bool = True
    ) -> Iterator[tuple[ShardRecord, ShardData]]:
        """Yield (record, data) for each committed shard, in order of ``start``.

        Uses one manifest snapshot taken at the first ``next()``; never lists shards/.
        """
        for rec in sorted(self.committed().values(), key=lambda r: (r.start, r.shard_id)):
            yield rec, self.read(rec, layers, verify)

    # ---- artifacts (preconditioner/, results/) -----------------------------------------
    def put_artifact(self, rel: str, data: bytes | memoryview) -> None:
        """Write (overwrite) an artifact such as ``preconditioner/main.safetensors``."""
        if rel.strip("/") == INDEX_FILE or rel.lstrip("/").startswith(_RESERVED_DIRS):
            raise ValueError(f"{rel!r} is reserved for the index itself")
        self.store.write_bytes(rel, data)

    def get_artifact(self, rel: str) -> bytes:
        """Bytes of an artifact; raises FileNotFoundError if absent."""
        return self.store.read_bytes(rel)

    def has_artifact(self, rel: str) -> bool:
        """Whether the artifact exists."""
        return self.store.exists(rel)


def _lost_index_file(store: Store) -> bool:
    """False where index.json may be created: the store holds no commit log. With one (an
    index whose index.json was deleted), CorruptIndexError: a new index.json would adopt
    its committed shards under the new job's settings; True where index.json appeared
    meanwhile (a racing creator: read it)."""
    log_files = store.list(manifest.MANIFEST_DIR)
    if not log_files:
        return False
    if store.exists(INDEX_FILE):
        return True
    raise CorruptIndexError(
        f"{store.url_of(INDEX_FILE)} is missing, but the store holds an index's commit log "
        f"({len(log_files)} entries under {manifest.MANIFEST_DIR}/): index.json was lost "
        "(deleted by hand, or by a lifecycle rule on the bucket), and a new one would adopt "
        "those shards under this job's settings. Fix: restore index.json (from a backup, or "
        "the bucket's object versions); or use a new store.url (or delete this folder) to "
        "build afresh."
    )


def _read_index(store: Store) -> dict[str, Any]:
    """The stored fingerprint; FileNotFoundError if index.json is absent."""
    for attempt in range(5):
        raw = store.read_bytes(INDEX_FILE)
        try:
            doc = json.loads(raw)
            version, fingerprint = doc["format_version"], doc["fingerprint"]
            break
        except (ValueError, KeyError, TypeError) as exc:
            # Without atomic create (rare local filesystems) a reader can catch it mid-write.
            if attempt == 4:
                raise CorruptIndexError(
                    f"{store.url_of(INDEX_FILE)} is unreadable ({exc}). Fix: restore it, or "
                    "use a new store.url and rebuild the index."
                ) from exc
            time.sleep(0.05)
    if version != FORMAT_VERSION:
        raise FingerprintMismatchError(
            f"index at {store.url_of('')} has format_version {version}; this grass_dist reads "
            f"{FORMAT_VERSION}. Fix: use a new store.url, or the grass_dist that wrote it."
        )
    return fingerprint


def _span(record: ShardRecord) -> np.ndarray:
    """The row ids a shard's file holds: its record's, in order."""
    return np.arange(record.start, record.end, dtype=np.int64)
