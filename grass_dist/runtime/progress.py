"""Job progress: a tqdm bar for people and a JSON record in the store for programs.

The record `<index>/_progress/<job id>.json` is rewritten (atomically) at every stage
boundary and at most every `cluster.progress_interval_s` seconds while shards complete, so
another process can follow a running job:

    python -m grass_dist.runtime.progress <index url>      # newest job's record
    python -m grass_dist.runtime.progress s3://b/idx --option endpoint_url=http://...
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from tqdm import tqdm

from grass_dist.errors import (
    DEFAULT_S3_ENDPOINT,
    StoreAccessDeniedError,
    StoreUnavailableError,
    StoreUnreachableError,
)
from grass_dist.index import Store

log = logging.getLogger(__name__)

PROGRESS_DIR = "_progress"
# The records of the jobs running in this process, for `interrupt_running`.
_RUNNING: weakref.WeakSet[JobProgress] = weakref.WeakSet()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class JobProgress:
    """Progress of one job's stages; the index stage also counts shards, rows, rate and ETA."""

    def __init__(self, store: Store, job_id: str, interval_s: float = 2.0, bar: bool = True):
        self.store = store
        self.job_id = job_id
        self.interval_s = interval_s
        self.show_bar = bar
        self.doc: dict[str, Any] = {
            "job_id": job_id,
            "stage": None,
            "state": "starting",
            "started": _now(),
            "updated": _now(),
            "stages": {},
            "index": None,
        }
        self._bar: tqdm | None = None
        self._bar_stage: str | None = None
        self._t0 = time.monotonic()
        self._written = 0.0
        self._by_node: Counter[str] = Counter()
        self._lock = threading.RLock()  # `finish` from another thread (Ctrl-C) against writes
        self._finished = False
        # Called as the record ends, before it says so: what the job did before its stages
        # counted it (the driver's commits while Ray started, `job._prepare_local`).
        self.before_finish: Callable[[], None] | None = None
        _RUNNING.add(self)

    @property
    def path(self) -> str:
        return f"{PROGRESS_DIR}/{self.job_id}.json"

    def write(self) -> None:
        """Rewrite the record now (readers see the old or the new one, never a mix).

        A failed write is logged, not raised: progress must never be what fails a job.
        Once the record says the job ended, nothing rewrites it.
        """
        with self._lock:
            if self._finished:
                return
            self.doc["updated"] = _now()
            self._written = time.monotonic()
            try:
                self.store.write_bytes(self.path, json.dumps(self.doc, indent=1).encode())
            except StoreUnavailableError as e:
                log.warning("progress record %s not written: %s", self.store.url_of(self.path), e)

    def held(self) -> threading.RLock:
        """The record's lock: held around a commit and its count, they land as one, and an
        ending record (`finish`, as Ctrl-C stops the job) waits for a commit in hand."""
        return self._lock

    def tick(self) -> None:
        """Rewrite the record if `interval_s` passed since the last write."""
        if time.monotonic() - self._written >= self.interval_s:
            self.write()

    # ---- stages ------------------------------------------------------------------------
    def begin(self, stage: str) -> None:
        self.doc["stage"], self.doc["state"] = stage, "running"
        self.doc["stages"][stage] = {"state": "running", "started": _now()}
        self.write()

    def end(self, stage: str, seconds: float, error: BaseException | None = None) -> None:
        state = "failed" if error else "done"
        self.doc["state"] = state
        self.doc["stages"][stage].update(state=state, seconds=round(seconds, 3))
        if error is not None:
            self.doc["error"] = _said(error)
        if self._bar is not None and (stage == self._bar_stage or error is not None):
            self._bar.close()  # not when start_workers, which overlaps it, ends first
            self._bar = None
        self.write()

    def finish(self, error: BaseException | None = None) -> None:
        """The job ended (with `error`, or done): so says the record, also for a job that ran
        no stage (every shard already committed) or failed between stages."""
        with self._lock:
            if self._finished:
                return
            if self.before_finish is not None:
                try:
                    self.before_finish()
                except Exception as e:  # noqa: BLE001 -- the record still ends
                    log.warning("progress record %s: %s", self.path, e)
            self.doc["state"] = "failed" if error is not None else "done"
            if error is not None:
                self.doc.setdefault("error", _said(error))
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self.write()
            self._finished = True
        _RUNNING.discard(self)

    # ---- shards ------------------------------------------------------------------------
    def first_shard(self, seconds: float) -> None:
        """The job's first shard was committed `seconds` after the job started."""
        with self._lock:
            self.doc["first_shard_s"] = round(seconds, 3)
            self.write()

    def index_plan(
        self,
        shards_total: int,
        skipped: int,
        rows_total: int,
        rows_todo: int,
        stage: str = "index",
        bar: bool = True,
        since_s: float = 0.0,
    ) -> None:
        """Start counting (the rate from `since_s` seconds ago): `skipped` of `shards_total`
        shards were committed before this run; the bar (none without `bar`) closes as
        `stage` ends."""
        self._t0 = time.monotonic() - since_s
        self._bar_stage = stage
        self.doc["index"] = {
            "shards_total": shards_total,
            "shards_skipped": skipped,
            "shards_done": skipped,
            "rows_total": rows_total,
            "rows_todo": rows_todo,
            "rows_done": 0,
            "rows_per_s": None,
            "eta_s": None,
            "shards_by_node": {},
        }
        if self.show_bar and bar and shards_total > skipped:
            self._bar = tqdm(
                total=shards_total,
                initial=skipped,
                desc="index shards",
                unit="shard",
                dynamic_ncols=True,
            )
        self.write()

    def shards_done(self, rows: int, nodes: list[str]) -> None:
        """`len(nodes)` more shards (`rows` rows) committed, computed on `nodes` (from the
        driver's thread or the index stage's)."""
        with self._lock:
            ix = self.doc["index"]
            self._by_node.update(nodes)
            ix["shards_done"] += len(nodes)
            ix["rows_done"] += rows
            elapsed = max(time.monotonic() - self._t0, 1e-9)
            rate = ix["rows_done"] / elapsed
            ix["rows_per_s"] = round(rate, 2)
            ix["eta_s"] = round((ix["rows_todo"] - ix["rows_done"]) / rate, 2) if rate > 0 else None
            ix["shards_by_node"] = dict(self._by_node)
            if self._bar is not None:
                self._bar.update(len(nodes))
                self._bar.set_postfix(rows_per_s=f"{rate:.0f}")
            self.tick()


def _said(error: BaseException) -> str:
    """'<type>: <message>'; Ctrl-C's KeyboardInterrupt, which has none, says what it was."""
    if isinstance(error, KeyboardInterrupt) and not str(error):
        return "KeyboardInterrupt: interrupted (Ctrl-C)"
    return f"{type(error).__name__}: {error}"


def interrupt_running(error: KeyboardInterrupt) -> None:
    """End the record of every job running in this process as failed by `error` (Ctrl-C,
    or SIGTERM: grass_dist.launch.Terminated): a job run on a thread of its own
    (`grass_dist.launch.door`) is not told, and would say "running" for good."""
    for progress in list(_RUNNING):
        progress.finish(error)


def read_progress(store: Store, job_id: str | None = None) -> dict[str, Any] | None:
    """The record of `job_id`, or the most recently updated one; None if there is none."""
    if job_id is not None:
        try:
            return json.loads(store.read_bytes(f"{PROGRESS_DIR}/{job_id}.json"))
        except FileNotFoundError:
            return None
    docs = []
    for name in store.list(PROGRESS_DIR):
        if name.endswith(".json"):
            try:
                docs.append(json.loads(store.read_bytes(f"{PROGRESS_DIR}/{name}")))
            except (FileNotFoundError, ValueError):
                continue  # a finished job's record removed by hand, or not ours
    return max(docs, key=lambda d: (d.get("updated", ""), d.get("started", "")), default=None)


def with_age(doc: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    """`doc`, and for a job that says it is still going, `seconds_since_update`: a driver
    killed outright (SIGKILL, a lost machine) leaves its record so, updated never again."""
    if doc.get("state") in ("starting", "running") and doc.get("updated"):
        now = now or datetime.now(timezone.utc)
        age = (now - datetime.fromisoformat(doc["updated"])).total_seconds()
        doc = {**doc, "seconds_since_update": round(age)}
    return doc


def reader_fix(error: StoreUnavailableError) -> str:
    """What the user of this read-only command can do about `error` (the jobs' fixes speak
    of store.* settings, every node and reruns, none of which applies here)."""
    endpoint = (
        "set AWS_ENDPOINT_URL=http://HOST:PORT or pass --option endpoint_url=http://HOST:PORT"
    )
    if isinstance(error, StoreAccessDeniedError):
        fix = (
            "Fix: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in this "
            "environment to credentials that may list and read this bucket and prefix"
        )
        if error.endpoint == DEFAULT_S3_ENDPOINT:
            fix += f"; for an index on an S3-compatible server, also {endpoint}"
        return fix + "."
    if isinstance(error, StoreUnreachableError):
        if error.endpoint == DEFAULT_S3_ENDPOINT:
            return (
                f"Fix: for an index on an S3-compatible server, {endpoint} (the endpoint the "
                "jobs get from store.storage_options); else check that this machine reaches "
                "AWS S3."
            )
        return (
            f"Fix: check that {error.endpoint or 'the store'} is up and reachable from this "
            f"machine; for another endpoint, {endpoint}."
        )
    return (
        "Fix: check the URL, the --option values and that this machine reaches the store "
        f"(for an S3-compatible server, {endpoint})."
    )


def _print(text: str) -> None:
    """Print `text`; a reader that closed the pipe (`... | head -1`) ends the command quietly,
    with the status of a command ended by SIGPIPE in a shell (128 + 13). SIGPIPE itself
    stays ignored, as Python leaves it: its default would also kill the process on a
    broken S3 connection, which must raise (and be retried) instead."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # The interpreter flushes stdout again at exit: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)


def main(argv: list[str] | None = None) -> None:
    """Print a job's progress record (default: the newest) of the index at a URL."""
    import argparse

    from grass_dist.index.gradient_index import INDEX_FILE

    p = argparse.ArgumentParser(
        prog="python -m grass_dist.runtime.progress",
        description="Print the progress record of the newest job (or --job) on an index. "
        "S3 credentials come from the environment, as for the jobs.",
    )
    p.add_argument("url", help="the index's store.url, e.g. outputs/index or s3://bucket/idx")
    p.add_argument("--job", help="a job id (the record's job_id) instead of the newest")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a store.storage_options entry, e.g. --option endpoint_url=http://127.0.0.1:8333",
    )
    args = p.parse_args(argv)
    options = dict(o.split("=", 1) for o in args.option if "=" in o)
    if len(options) != len(args.option):
        p.error("--option takes KEY=VALUE")
    try:
        store = Store(args.url, options)
        doc = read_progress(store, args.job)
        if doc is None and not store.exists(INDEX_FILE):
            sys.exit(f"error: no gradient index at {store.url_of('')} ({INDEX_FILE} not found)")
    except StoreUnavailableError as e:
        sys.exit(f"error: {e.problem()}. {reader_fix(e)}")
    if doc is None:
        which = f"of job {args.job} " if args.job else ""
        sys.exit(f"error: no progress record {which}under {store.url_of(PROGRESS_DIR)}")
    _print(json.dumps(with_age(doc), indent=1))


if __name__ == "__main__":
    main()
