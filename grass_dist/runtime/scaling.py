"""Elastic growth policy: how many workers to add when a node joins (or resources free up).

Pure functions over resource dicts so the policy is tested without a cluster. The pool asks
every `cluster.scale_check_s` seconds; workers never shrink on purpose (a lost node's
workers are replaced, and their replacements wait for resources like any other).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ScaleDecision:
    """Workers to start now (0 = none) and why, for the log."""

    add: int
    reason: str


def fits(free: dict[str, float], request: dict[str, float]) -> int:
    """How many workers asking `request` fit in `free` (resource name -> amount)."""
    counts = [math.floor(free.get(k, 0.0) / v + 1e-9) for k, v in request.items() if v > 0]
    return max(0, min(counts)) if counts else 0


def _show(resources: dict[str, float], keys) -> str:
    return ", ".join(f"{k}={resources.get(k, 0.0):g}" for k in sorted(keys))


def grow(
    workers: int, max_workers: int, free: dict[str, float], request: dict[str, float]
) -> ScaleDecision:
    """Decide how many workers to add.

    A starting worker already placed holds its resources (they are not free); one still
    waiting for resources would have been placed if they were free. So free resources are
    room for new workers, and starting ones count only against the ceiling. (Right after a
    node joins, Ray may not have placed a waiting worker yet; the worst case is a worker
    that waits too, never more than `max_workers` in all.)

    Args:
        workers: workers in the pool, ready or starting.
        max_workers: `cluster.max_workers` (the ceiling).
        free: `ray.available_resources()`.
        request: resources one worker asks for (CPU, GPU, custom).
    """
    if workers >= max_workers:
        return ScaleDecision(0, f"pool is at cluster.max_workers={max_workers}")
    need, have = _show(request, request), _show(free, request)
    room = fits(free, request)
    if room <= 0:
        return ScaleDecision(0, f"no free resources for another worker (needs {need}, free {have})")
    add = min(room, max_workers - workers)
    return ScaleDecision(
        add,
        f"free resources ({have}) fit {room} more worker(s) needing {need}; growing "
        f"{workers} -> {workers + add} (cluster.max_workers={max_workers})",
    )
