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
from grass_dist.index.manifest import ManifestLog, ShardRecord
from grass_dist.index.retry import RetryPolicy
from grass_dist.index.shards import ShardData
from grass_dist.index.store import Store

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
# The _target_ by which a fingerprint records an object given in memory (grass_dist.assembly).
_IN_MEMORY = "grass_dist.assembly.in_memory"
FORMAT_VERSION = 1
_RESERVED_DIRS = (f"{manifest.MANIFEST_DIR}/", "shards/")
_SHARD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MISSING = object()


def _canonical(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """JSON round trip: tuples become lists, keys strings, so stored == requested compares."""
    try:
        return json.loads(json.dumps(fingerprint, sort_keys=True))
    except TypeError as exc:
        raise TypeError(f"fingerprint must be JSON-serialisable: {exc}") from exc


def _show(value: Any, limit: int = 60) -> str:
    text = "<missing>" if value is _MISSING else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(items: Any) -> list[str] | None:
    """The "name"s of a list of named entries (the fingerprint's layers), else None."""
    if not isinstance(items, list) or not all(isinstance(x, dict) and "name" in x for x in items):
        return None
    names = [str(x["name"]) for x in items]
    return names if len(set(names)) == len(names) else None


def fingerprint_diff(stored: Any, requested: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Differing leaves as (key path like ``layers['fc1'].k``, stored, requested). Lists of
    named entries are compared name by name, so an added, left-out or reordered layer is
    named rather than shown as two long lists."""
    if isinstance(stored, dict) and isinstance(requested, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in sorted(set(stored) | set(requested)):
            sub = f"{path}.{key}" if path else str(key)
            out += fingerprint_diff(stored.get(key, _MISSING), requested.get(key, _MISSING), sub)
        return out
    ours, theirs = _names(stored), _names(requested)
    if ours is not None and theirs is not None and (ours or theirs):
        was, now = dict(zip(ours, stored, strict=True)), dict(zip(theirs, requested, strict=True))
        common = [n for n in ours if n in now]
        out = []
        if common != [n for n in theirs if n in was]:
            out.append((f"{path} (order)", common, [n for n in theirs if n in was]))
        for name in ours + [n for n in theirs if n not in was]:
            sub = f"{path}[{name!r}]"
            out += fingerprint_diff(was.get(name, _MISSING), now.get(name, _MISSING), sub)
        return out
    if isinstance(stored, list) and isinstance(requested, list) and len(stored) == len(requested):
        return [
            d
            for i, (a, b) in enumerate(zip(stored, requested, strict=True))
            for d in fingerprint_diff(a, b, f"{path}[{i}]")
        ]
    same = (
        stored is not _MISSING
        and requested is not _MISSING
        and (json.dumps(stored, sort_keys=True) == json.dumps(requested, sort_keys=True))
    )
    return [] if same else [(path or "<fingerprint>", stored, requested)]


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
        requested = _canonical(fingerprint)
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
            _check_fingerprint(store, stored, requested)
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
                "`python -m jobs.index` first, or point store.url at an existing index."
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
                f"shard {shard_id} has layers {_show(got, 200)} but the index at "
                f"{self.store.url_of('')} expects {_show(want, 200)}. Fix: use the same "
                "model/compression settings as the index, or a new store.url."
            )
        attempt = uuid.uuid4().hex  # unique per attempt: files are never overwritten
        rel = f"shards/{shard_id}/{attempt}.parquet"
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
        """Read a committed shard, checking its sha256 (if ``verify``) and row count."""
        data = shards.read_shard(self.store, record.file, layers, record.sha256 if verify else None)
        if len(data) != record.rows:
            raise CorruptShardError(
                f"shard file {self.store.url_of(record.file)} has {len(data)} rows, the "
                f"manifest says {record.rows}. Fix: rerun `python -m jobs.index "
                "index.repair=true` to recompute it."
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


def _no_commit_yet(store: Store) -> str:
    """What an index without a committed shard means: a job stopped before its first
    commit, whose index may go, or one that started and writes it now, whose may not."""
    from grass_dist.runtime.progress import read_progress  # it imports this package

    url = store.url_of("")
    newest = read_progress(store)  # one killed outright says it runs for good: its time shows
    if newest is not None and newest.get("state") in ("starting", "running"):
        return (
            f"It holds no committed shard yet, and job {newest.get('job_id')} is writing it (its "
            f"progress record says it runs, updated {newest.get('updated')}): do not delete it "
            f"while that job runs; wait for it, or use another store.url."
        )
    return (
        f"It holds no committed shard: a job stopped before its first commit, or one that "
        f"started moments ago is writing it (its progress record comes seconds after: "
        f"`python -m grass_dist.runtime.progress {url}`). Once no job writes it, nothing is "
        f"lost by deleting it: remove {url} and rerun."
    )


def _check_fingerprint(store: Store, stored: dict[str, Any], requested: dict[str, Any]) -> None:
    diffs = fingerprint_diff(stored, requested)
    if not diffs:
        return
    lines = "\n".join(f"  {path}: stored={_show(a)} requested={_show(b)}" for path, a, b in diffs)
    empty = ""
    if ManifestLog(store).snapshot()[0] == 0:
        empty = f"\n{_no_commit_yet(store)}"
    fix = (
        "use a new store.url (or index.url) for these settings, or rerun with the same "
        "model/compression/data settings as the existing index."
    )
    if _IN_MEMORY in json.dumps(stored) and _IN_MEMORY not in json.dumps(requested):
        fix = (
            "this index was built from Python objects (the Python API's Index.build given a "
            "model or dataset in memory), which no config can name: score it in that Python "
            "session with Index.attribute, or build the index from factories (README: Python "
            "API) to score it with the jobs."
        )
    raise FingerprintMismatchError(
        f"the gradient index at {store.url_of('')} was built with a different fingerprint:\n"
        f"{lines}\nFix: {fix}{empty}"
    )
