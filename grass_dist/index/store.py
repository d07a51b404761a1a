"""A thin fsspec wrapper: one store root, paths relative to it, create-only puts, safe errors.

Works on plain local paths, ``file://``, ``memory://`` and ``s3://`` (s3fs). Storage options
may hold credentials, so they never appear in ``repr``, logs or exception messages.

Create-only puts (manifest commits) are read back before they count, and
``check_create_only`` refuses a store that lets a create-only put replace an object.

Every operation retries transient failures with bounded backoff (``retry.RetryPolicy``) and
then raises one of three errors, each naming the store and, for S3, its endpoint:
``StoreUnreachableError`` (outage outlasted the retries), ``StoreAccessDeniedError``
(credentials or permissions) or ``StoreUnavailableError`` (anything else).
"""

from __future__ import annotations

import copy
import errno
import os
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from typing import IO, Any, TypeVar

import fsspec.core
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from grass_dist.errors import (
    DEFAULT_S3_ENDPOINT,
    ConfigError,
    CreateOnlyUnsupportedError,
    StoreAccessDeniedError,
    StoreUnavailableError,
    StoreUnreachableError,
    at_endpoint,
)
from grass_dist.index import local_files
from grass_dist.index.retry import (
    RetryPolicy,
    is_access_denied,
    is_lost_race,
    is_storage_error,
    is_transient,
    is_unclear_refusal,
)
from grass_dist.urls import redact_url, url_credentials

T = TypeVar("T")

# memory:// emulates create-only with exists + write; this lock makes that pair atomic for
# all threads of the process (memory:// is per process anyway).
_MEMORY_LOCK = threading.Lock()
_S3_SCHEMES = ("s3", "s3a")
_RANGE_BYTES = 8 * 2**20  # S3 objects above this are read in ranges of this size


def _secret_strings(value: Any) -> list[str]:
    """All string leaves of ``storage_options`` long enough to be worth scrubbing."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in _secret_strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _secret_strings(v)]
    return [value] if isinstance(value, str) and len(value) >= 4 else []


class Store:
    """A storage root addressed by an fsspec URL; every path argument is relative to it.

    Args:
        url: local path, ``file://...``, ``memory://...`` or ``s3://bucket/prefix``.
        storage_options: passed to fsspec (endpoint, credentials, ...); kept out of messages.
            For ``s3://``, botocore's own retries are off unless
            ``config_kwargs.retries`` is given, so that ``retry`` alone bounds the waiting.
        retry: backoff policy for transient failures (default ``RetryPolicy()``).
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        scheme, sep, rest = url.partition("://")
        # A URL keeps "memory://" intact and loses trailing slashes; a plain local path is made
        # absolute so it names the same directory in every worker.
        self.url = (
            f"{scheme}://{rest.rstrip('/')}" if sep else os.path.abspath(os.path.expanduser(url))
        )
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self.retry = retry or RetryPolicy()
        self._fs: AbstractFileSystem | None = None
        self._root = ""
        self._create_only_checked = False  # see check_create_only

    # ---- identity, pickling, display -------------------------------------------------
    def __reduce__(self) -> tuple[Any, ...]:
        # Ship only the URL, options and policy; the filesystem (sessions, loops) is rebuilt.
        return (Store, (self.url, self.storage_options, self.retry))

    def __repr__(self) -> str:
        keys = sorted(self.storage_options)
        return f"Store({redact_url(self.url)!r}, storage_options keys={keys})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Store) and (self.url, self.storage_options, self.retry) == (
            other.url,
            other.storage_options,
            other.retry,
        )

    def __hash__(self) -> int:
        return hash(self.url)

    def url_of(self, rel: str) -> str:
        """Display URL of ``rel`` (credentials removed), for messages and logs."""
        rel = rel.strip("/")
        return f"{redact_url(self.url)}/{rel}" if rel else redact_url(self.url)

    @property
    def is_s3(self) -> bool:
        """Whether the URL names an S3 bucket (``s3://`` or ``s3a://``)."""
        return self.url.partition("://")[0] in _S3_SCHEMES

    def _endpoint_url(self) -> str | None:
        opts = self.storage_options
        client = opts.get("client_kwargs") or {}
        url = (
            opts.get("endpoint_url")
            or client.get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        return str(url) if url else None

    @property
    def endpoint(self) -> str | None:
        """The S3 endpoint requests go to (credentials removed); None for other stores."""
        if not self.is_s3:
            return None
        url = self._endpoint_url()
        return redact_url(url) if url else DEFAULT_S3_ENDPOINT

    # ---- internals -------------------------------------------------------------------
    def _fs_options(self) -> dict[str, Any]:
        # A deep copy: botocore rewrites the retry dict it is given, and ours is pickled.
        opts = copy.deepcopy(self.storage_options)
        if self.is_s3:
            config = opts.setdefault("config_kwargs", {})
            config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        return opts

    @property
    def fs(self) -> AbstractFileSystem:
        """The fsspec filesystem, created on first use (also after unpickling)."""
        if self._fs is None:
            try:
                fs, root = fsspec.core.url_to_fs(self.url, **self._fs_options())
            except Exception as exc:  # unknown protocol, missing driver, bad options
                raise self._error("cannot create filesystem", exc) from exc
            self._fs, self._root = fs, root.rstrip("/")
        return self._fs

    @property
    def _is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def _path(self, rel: str) -> str:
        fs = self.fs  # sets self._root
        rel = rel.strip("/")
        if any(part == ".." for part in rel.split("/")):
            raise ValueError(f"store paths may not contain '..': {rel!r}")
        path = f"{self._root}/{rel}" if rel else self._root
        return path.replace("/", os.sep) if isinstance(fs, LocalFileSystem) else path

    def _error(self, what: str, exc: BaseException, seconds: float = 0.0) -> StoreUnavailableError:
        reason = f"{what}: {type(exc).__name__}: {exc}"
        url, endpoint = redact_url(self.url), self.endpoint
        secrets = _secret_strings(self.storage_options) + url_credentials(self.url)
        secrets += url_credentials(self._endpoint_url() or "") if self.is_s3 else []
        for secret in sorted(secrets, key=len, reverse=True):  # "key:secret" before "key"
            if secret != endpoint:  # the endpoint is shown anyway (minus any credentials)
                reason = reason.replace(secret, "***")
        if endpoint is not None and is_access_denied(exc):
            from grass_dist.saved_config import credentials  # hydra: the error path only

            given = credentials({"storage_options": self.storage_options})
            return StoreAccessDeniedError(
                url, reason, endpoint, "store.storage_options" if given else None
            )
        if is_transient(exc):
            attempts = self.retry.attempts
            reason += f" (gave up after {attempts} attempt(s) over {seconds:.1f} s)"
            return StoreUnreachableError(url, reason, endpoint)
        return StoreUnavailableError(url, reason, endpoint)

    def _call(
        self,
        what: str,
        fn: Callable[[], T],
        passthrough: tuple[type[BaseException], ...] = (),
    ) -> T:
        """``fn()`` with retries; storage errors become the store errors named above."""
        t0 = time.monotonic()
        try:
            return self.retry.call(fn, f"{what} in {self.url_of('')}")
        except passthrough:
            raise
        except StoreUnavailableError:
            raise
        except Exception as exc:
            if is_storage_error(exc):
                raise self._error(what, exc, time.monotonic() - t0) from exc
            raise

    # ---- operations ------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        """Whether the object ``rel`` exists."""
        path = self._path(rel)
        return self._call(f"cannot check {rel!r}", lambda: bool(self.fs.exists(path)))

    def read_bytes(self, rel: str) -> bytes:
        """Whole object ``rel``; raises FileNotFoundError if it does not exist."""
        path = self._path(rel)

        def get() -> bytes:
            if self.is_s3:
                # s3fs sizes a read from its listing cache when that holds the parent folder,
                # and so calls an object created after the listing missing: drop those entries.
                self.fs.invalidate_cache(path)
            return bytes(self.fs.cat_file(path))

        return self._call(f"cannot read {rel!r}", get, passthrough=(FileNotFoundError,))

    def read_buffer(self, rel: str) -> bytes | bytearray:
        """Whole object ``rel`` as a bytes-like buffer, for large objects (shards).

        From S3, objects over ``_RANGE_BYTES`` are fetched in ranges pinned to the object's
        ETag (a concurrent overwrite fails the read, which is then retried whole) straight
        into one preallocated buffer: peak memory is the object plus one range, where a
        single GET holds about three copies. Raises FileNotFoundError if it does not exist.
        """
        path = self._path(rel)

        def get() -> bytes | bytearray:
            if not self.is_s3:
                return self.fs.cat_file(path)
            self.fs.invalidate_cache(path)  # as in read_bytes: a stale listing hides new objects
            with self.fs.open(path, "rb", block_size=_RANGE_BYTES, cache_type="none") as f:
                size = int(f.size)
                if size <= _RANGE_BYTES:
                    return f.read()
                buf, pos = bytearray(size), 0
                view = memoryview(buf)
                while pos < size:
                    chunk = f.read(_RANGE_BYTES)
                    if not chunk:
                        raise OSError(errno.EIO, f"object ended at byte {pos} of {size}")
                    view[pos : pos + len(chunk)] = chunk
                    pos += len(chunk)
                return buf

        return self._call(f"cannot read {rel!r}", get, passthrough=(FileNotFoundError,))

    def write_bytes(self, rel: str, data: bytes | memoryview) -> None:
        """Write (or overwrite) ``rel``; readers never observe a partially written object."""
        path = self._path(rel)

        def put() -> None:
            if self._is_local:
                # Temp file in the same directory + os.replace: atomic on POSIX and Windows.
                os.replace(local_files.finished_temp(path, data), path)
            else:
                self.fs.pipe_file(path, bytes(data))  # object-store puts are atomic

        self._call(f"cannot write {rel!r}", put)

    def create_only(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist yet; True when ``rel`` now holds ``data``.

        The object is read back after every put, and its bytes decide, not the put's answer:

        - a put that succeeded must read back as ``data``; anything else means the store
          replaced a create-only object: CreateOnlyUnsupportedError;
        - a put refused because the object exists (FileExistsError, HTTP 412/409), or refused
          with a bare EINVAL/EBUSY that kept no HTTP status, is a lost race when the object
          holds other bytes, ours when it holds ``data`` (a retried put whose first try
          landed), and a store error when there is no object at all.

        Raises:
            CreateOnlyUnsupportedError: a put that succeeded did not leave ``data`` there.
        """
        path = self._path(rel)
        fs = self.fs
        refused: list[BaseException] = []  # why a put was refused, for the read-back below

        def put() -> bool:
            if isinstance(fs, LocalFileSystem):
                return local_files.create_only(path, data)
            if isinstance(fs, MemoryFileSystem):
                with _MEMORY_LOCK:
                    if fs.exists(path):
                        return False
                    fs.pipe_file(path, bytes(data))
                    return True
            try:
                # s3fs sends If-None-Match: *; generic fsspec falls back to exists + write.
                fs.pipe_file(path, bytes(data), mode="create")
            except Exception as exc:
                lost = isinstance(exc, FileExistsError) or (
                    self.is_s3 and (is_lost_race(exc) or is_unclear_refusal(exc))
                )
                if not lost:
                    raise
                refused[:] = [exc]
                return False
            return True

        what = f"cannot create {rel!r}"
        written = self._call(what, put)
        try:
            held: bytes | None = self.read_bytes(rel)
        except FileNotFoundError:
            held = None
        if written and held != data:
            state = "nothing" if held is None else f"{len(held)} other bytes"
            raise CreateOnlyUnsupportedError(
                self._not_enforced(f"{self.url_of(rel)} held {state} right after it was written")
            )
        if held is None and refused and not is_lost_race(refused[0]):
            raise self._error(what, refused[0])  # refused, yet nothing there: not a race
        return held == data

    def check_create_only(self) -> None:
        """Refuse a store that does not enforce create-only puts (probed once per instance).

        Two create-only puts of one fresh probe object: the second must be refused. Manifest
        commits rely on this; without it no commit protocol on the store alone is safe (a lock
        or a lease would itself be a create-only object), so such a store is refused.

        Raises:
            CreateOnlyUnsupportedError: the second put replaced the first.
        """
        if self._create_only_checked:
            return
        rel = f"_probe-create-only-{uuid.uuid4().hex}"  # at the top: no folder left behind
        try:
            if not self.create_only(rel, b"grass_dist create-only probe 1"):
                raise self._error("create-only probe", OSError("a fresh probe object existed"))
            if self.create_only(rel, b"grass_dist create-only probe 2"):
                raise CreateOnlyUnsupportedError(
                    self._not_enforced(f"a second create-only put replaced {self.url_of(rel)}")
                )
        finally:
            self.delete(rel)
        self._create_only_checked = True

    def _not_enforced(self, what: str) -> str:
        at = at_endpoint(self.endpoint)
        return (
            f"the index store {self.url_of('')!r}{at} does not enforce create-only writes "
            f"({what}), so two jobs committing at once could both write the same manifest "
            "version and the shards of one would silently drop out of the index. Fix: use a "
            "store that enforces conditional writes (on S3, PutObject with If-None-Match: *, "
            "as AWS S3 and SeaweedFS do) or a local filesystem path for store.url."
        )

    def list(self, rel_dir: str) -> list[str]:
        """Sorted names (not paths) directly under ``rel_dir``; [] if it does not exist."""
        path = self._path(rel_dir)

        def ls() -> list[str]:
            self.fs.invalidate_cache()  # fsspec caches listings; other writers may have added
            try:
                return list(self.fs.ls(path, detail=False))
            except FileNotFoundError:
                return []

        entries = self._call(f"cannot list {rel_dir!r}", ls)
        names = {str(e).replace(os.sep, "/").rstrip("/").rsplit("/", 1)[-1] for e in entries}
        return sorted(n for n in names if n)

    def walk(self, rel_dir: str) -> dict[str, tuple[int, float | None]]:
        """Every object under ``rel_dir``, recursively: path relative to the root -> (bytes,
        modification time in seconds since the epoch, by the store's clock; None if the
        filesystem reports none). {} if ``rel_dir`` does not exist.
        """
        path = self._path(rel_dir).replace(os.sep, "/")

        def find() -> dict[str, dict[str, Any]]:
            self.fs.invalidate_cache()  # other writers may have added objects
            try:
                return self.fs.find(path, detail=True)
            except FileNotFoundError:
                return {}

        found = self._call(f"cannot list {rel_dir!r}", find)
        root = self._root.replace(os.sep, "/").rstrip("/") + "/"
        return {
            name.replace(os.sep, "/").removeprefix(root): (int(info["size"]), _modified(info))
            for name, info in found.items()
        }

    def delete(self, rel: str) -> None:
        """Delete the object ``rel``; a missing object is not an error."""
        path = self._path(rel)

        def rm() -> None:
            with suppress(FileNotFoundError):
                self.fs.rm_file(path)

        self._call(f"cannot delete {rel!r}", rm)

    def prune_folders(self, rel_dir: str) -> None:
        """Remove the empty folders under ``rel_dir``, itself included, on a local store
        (deleting a folder's last object leaves the folder there; object stores have none)."""
        if not self._is_local:
            return
        for folder, _, _ in os.walk(self._path(rel_dir), topdown=False):
            with suppress(OSError):  # not empty (or gone): kept
                os.rmdir(folder)

    def open(self, rel: str, mode: str = "rb") -> IO[Any]:
        """Open ``rel`` as a file object (local parents are created for write modes)."""
        path = self._path(rel)

        def op() -> IO[Any]:
            if self._is_local and any(c in mode for c in "wxa"):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            return self.fs.open(path, mode)

        return self._call(f"cannot open {rel!r}", op, passthrough=(FileNotFoundError,))

    def check_writable(self) -> None:
        """Write, read back and delete a small probe object, then ``check_create_only``.

        Jobs call this before any compute so a bad URL or credentials, or a store whose
        create-only puts are not enforced, fail in seconds.

        Raises:
            StoreUnavailableError: the probe cannot be written or read back.
            CreateOnlyUnsupportedError: see ``check_create_only``.
        """
        if self._is_local:
            self._check_local_folder()
        if self.is_s3:
            self._check_bucket()
        rel = f"_probe-{uuid.uuid4().hex}"  # at the top: no folder left behind
        payload = b"grass_dist write probe"
        self.write_bytes(rel, payload)
        try:
            if self.read_bytes(rel) != payload:
                raise self._error("probe", OSError("read back different bytes"))
        except FileNotFoundError as exc:
            raise self._error("probe object vanished after writing", exc) from exc
        finally:
            self.delete(rel)
        self.check_create_only()

    def _check_bucket(self) -> None:
        """Refuse a bucket that does not exist (a misspelt one: a server such as SeaweedFS
        would create it at the probe's put). Any other failure is left to the probe, which
        names it (access denied, endpoint unreachable)."""
        bucket = self._path("").split("/", 1)[0]
        try:
            self.fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise ConfigError(
                f"the bucket {bucket!r} of the index store {self.url_of('')} does not exist"
                f"{at_endpoint(self.endpoint)}. Fix: check the bucket's name in store.url (or "
                f"index.url), or create the bucket first (e.g. `aws s3 mb s3://{bucket}`, or "
                f"with the job's credentials and endpoint in the environment: python -c "
                f"\"import s3fs; s3fs.S3FileSystem().mkdir('{bucket}')\")"
            ) from None
        except Exception:  # noqa: BLE001 -- the probe's put reports it, by kind
            return

    def _check_local_folder(self) -> None:
        """Refuse a local store path that is, or lies inside, an existing file."""
        self.fs  # noqa: B018 -- sets self._root
        path = self._root
        while path and not os.path.exists(path):
            path = os.path.dirname(path)
        if path and not os.path.isdir(path):
            inside = "is" if path == self._root else f"lies inside {path}, which is"
            raise ConfigError(
                f"the index store {self._root} {inside} a file, not a folder. Fix: set "
                f"store.url (or index.url) to a folder path; it is created if absent"
            )


def _modified(info: dict[str, Any]) -> float | None:
    """An fsspec info dict's modification time (local: mtime, S3: LastModified, memory: created)."""
    for key in ("mtime", "LastModified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None
