"""A committer process for the race test: spawned, so it imports only the index package."""

from __future__ import annotations

from typing import Any

import numpy as np

from grass_dist.index import GradientIndex, Store

LAYER, K, ROWS = "fc", 4, 3


def phi_of(shard: int) -> dict[str, np.ndarray]:
    """Deterministic phi (ROWS, K) of shard number ``shard``, so readers can check values."""
    return {LAYER: np.arange(ROWS * K, dtype=np.float32).reshape(ROWS, K) + 1000 * shard}


def commit_shards(
    url: str, options: dict[str, Any], proc: int, shards: list[int], barrier: Any, lost: Any
) -> None:
    """Commit each of ``shards`` on its own, all processes in lockstep; also race on "dup".

    Counts lost create-only races into ``lost`` (a shared integer).
    """
    original = Store.create_only

    def counting(self: Store, rel: str, data: bytes) -> bool:
        won = original(self, rel, data)
        if not won:
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
