"""Overlap inside one worker: load the next shard and write the last one while computing.

A GradientWorker runs up to `cluster.max_inflight_per_worker` shard calls at once (a
threaded Ray actor), each going through three phases: `load` (read and collate rows),
`compute` (forward/backward/compress) and `write` (Parquet encode + put). Only `compute`
is exclusive, so the queued shard's data is loaded while the current one computes and a
finished shard's file is written while the next computes. The bound on calls in flight
bounds memory: at most that many shards are held by a worker at any time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class PhaseSpan:
    """One phase of one shard: wall-clock seconds (time.time) of its start and end."""

    shard_id: str
    phase: str
    start: float
    end: float


class Phases:
    """Runs phases of concurrent shard calls; `compute` holds the worker's one compute slot."""

    EXCLUSIVE = ("compute",)

    def __init__(self, keep: int = 256):
        self._compute = threading.Lock()
        self._spans: list[PhaseSpan] = []
        self._spans_lock = threading.Lock()
        self._keep = keep

    @contextmanager
    def run(self, shard_id: str, phase: str) -> Iterator[None]:
        """Time `phase` of `shard_id`; serialise it with other shards if it is `compute`."""
        lock = self._compute if phase in self.EXCLUSIVE else None
        if lock is not None:
            lock.acquire()
        start = time.time()
        try:
            yield
        finally:
            end = time.time()
            if lock is not None:
                lock.release()
            with self._spans_lock:
                self._spans.append(PhaseSpan(shard_id, phase, start, end))
                del self._spans[: -self._keep]

    def spans(self) -> list[PhaseSpan]:
        """The most recent phase spans (at most `keep`), in order of completion."""
        with self._spans_lock:
            return list(self._spans)

    def seconds(self, shard_id: str) -> dict[str, float]:
        """phase -> seconds for one shard."""
        return {s.phase: s.end - s.start for s in self.spans() if s.shard_id == shard_id}


def overlap_seconds(spans: list[PhaseSpan], phase: str, other: str) -> float:
    """Total seconds during which some shard's `phase` ran while another shard's `other` ran."""
    total = 0.0
    for a in spans:
        if a.phase != phase:
            continue
        for b in spans:
            if b.phase == other and b.shard_id != a.shard_id:
                total += max(0.0, min(a.end, b.end) - max(a.start, b.start))
    return total
