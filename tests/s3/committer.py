"""Committer processes for the race tests: spawned, so they import only the index package
(and the ``ignorecreate://`` test store, so that they can open it too)."""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from typing import Any

import numpy as np

from grass_dist.errors import ShardCollectedError
from grass_dist.index import GradientIndex, Store, manifest
from grass_dist.index.manifest import MANIFEST_DIR
from tests.s3 import lax_fs  # noqa: F401 -- registers ignorecreate:// in this process

LAYER, K, ROWS = "fc", 4, 3


def phi_of(shard: int) -> dict[str, np.ndarray]:
    """Deterministic phi (ROWS, K) of shard number ``shard``, so readers can check values."""
    return {LAYER: np.arange(ROWS * K, dtype=np.float32).reshape(ROWS, K) + 1000 * shard}


def commit_shards(
    url: str,
    options: dict[str, Any],
    proc: int,
    shards: list[int],
    barrier: Any,
    lost: Any,
    checkpoint_every: int,
    hold: Any = None,
) -> None:
    """Commit each of ``shards`` on its own, all processes in lockstep; also race on "dup".

    Counts lost manifest races into ``lost`` (a shared integer); the store's create-only
    probe, refused by design, is not one. Writes a checkpoint every ``checkpoint_every``
    versions. With ``hold`` (an Event), each process waits after its first commit until the
    event is set (at most 60 s): a reader racing the committers is sure to see a version
    between the first and the last, however slowly a loaded machine runs it.
    """
    manifest.CHECKPOINT_EVERY = checkpoint_every  # this process only
    original = Store.create_only

    def counting(self: Store, rel: str, data: bytes) -> bool:
        won = original(self, rel, data)
        if not won and rel.startswith(MANIFEST_DIR):
            with lost.get_lock():
                lost.value += 1
        return won

    Store.create_only = counting  # this process only
    index = GradientIndex.open(url, options)
    for shard in [*shards, None]:
        sid = "dup" if shard is None else f"s{shard:03d}"
        start = 10_000 if shard is None else shard * ROWS
        phi = phi_of(proc if shard is None else shard)
        rows = np.arange(start, start + ROWS)
        record = index.write_shard(sid, start, start + ROWS, rows, [f"r{r}" for r in rows], phi)
        barrier.wait(timeout=60)  # everyone commits at the same moment
        index.commit([record])
        if hold is not None and shard == shards[0]:
            hold.wait(timeout=60)


def write_and_commit(url: str, options: dict[str, Any], count: int, stats: Any) -> None:
    """Write and commit shards w000.. one by one, pausing between write and commit, while gc
    runs; also abandon an attempt of every third shard (garbage for gc).

    ``stats``: shared [commits refused because gc had collected the file, bytes written].
    """
    index = GradientIndex.open(url, options)
    for i in range(count):
        rows = np.arange(ROWS * i, ROWS * i + ROWS)
        while True:
            for _ in range(2 if i % 3 == 0 else 1):
                record = index.write_shard(
                    f"w{i:03d}", rows[0], rows[-1] + 1, rows, ["k"] * ROWS, phi_of(i)
                )
                stats[1] += record.nbytes
            time.sleep(random.uniform(0, 0.05))  # written, not yet committed: gc's window
            try:
                index.commit([record])
                break
            except ShardCollectedError:
                stats[0] += 1  # as the driver would: compute the shard again


def race(
    url: str, options: dict[str, Any], procs: int, per_proc: int, checkpoint_every: int = 1000
) -> tuple[list[int], int]:
    """Run ``procs`` committer processes of ``per_proc`` shards each on the index at ``url``.

    Returns (their exit codes, create-only races they lost).
    """
    ctx = mp.get_context("spawn")  # fresh interpreters: never fork a process running Ray
    barrier, lost = ctx.Barrier(procs), ctx.Value("i", 0)
    shards = [list(range(p, procs * per_proc, procs)) for p in range(procs)]
    workers = [
        ctx.Process(
            target=commit_shards,
            args=(url, options, p, shards[p], barrier, lost, checkpoint_every),
        )
        for p in range(procs)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    return [w.exitcode for w in workers], lost.value
