"""Integrity repair: find committed shards that fail their checks and recompute only those.

``scan`` reads every committed shard in map calls (sha256, parse, row count: Ray tasks, or
the job's workers lent to it) and names the bad ones. ``recompute`` has the workers write a
fresh attempt of each bad shard's rows and commits it with ``replace``, a compare-and-swap
on the bad attempt (see ``grass_dist.index.manifest``). Nothing is deleted: until the
replacement is committed, the manifest keeps pointing at the old file, and older manifests
keep naming it afterwards.
"""

from __future__ import annotations

import logging
from typing import Any

from grass_dist.config import ClusterConfig
from grass_dist.index import GradientIndex, ShardRecord
from grass_dist.runtime.executors import Executor
from grass_dist.runtime.pool import ActorPool
from grass_dist.runtime.scheduler import run_items
from grass_dist.runtime.worker import ShardPlan, ShardResult

log = logging.getLogger(__name__)


def _check(index: GradientIndex, records: list[ShardRecord]) -> list[tuple[str, str]]:
    out = []
    for record in records:
        problem = index.check_shard(record)
        if problem is not None:
            out.append((record.shard_id, problem))
    return out


def scan(
    index: GradientIndex, parallelism: int, ex: Executor | None = None
) -> tuple[dict[str, ShardRecord], dict[str, str]]:
    """(committed records, shard_id -> problem for each bad one), checked by `parallelism`
    map calls of `ex` (default: Ray tasks)."""
    ex = ex or Executor()
    committed = index.committed()
    records = sorted(committed.values(), key=lambda r: (r.start, r.shard_id))
    n = max(1, min(parallelism, len(records)))
    refs = [ex.submit(i, _check, index, records[i::n]) for i in range(n)] if records else []
    bad = dict(pair for part in ex.get(refs) for pair in part)
    for shard_id in sorted(bad):
        log.warning("bad shard %s: %s", shard_id, bad[shard_id])
    return committed, bad


def recompute(
    index: GradientIndex,
    pool: ActorPool,
    bad: list[ShardRecord],
    cluster: ClusterConfig,
) -> dict[str, Any]:
    """Write a new attempt of each bad shard and commit it in place of the bad attempt."""
    plans = [ShardPlan(r.shard_id, r.start, r.end) for r in bad]
    replace = {r.shard_id: r.attempt for r in bad}
    done: dict[str, str] = {}

    def commit(batch: list[tuple[ShardPlan, ShardResult]]) -> None:
        index.commit([res.record for _, res in batch], replace=replace)
        done.update((plan.shard_id, res.record.file) for plan, res in batch)

    run_items(
        pool,
        plans,
        lambda a, p: a.index_shard.remote(p),
        commit,
        describe=lambda p: f"repair of shard {p.shard_id}",
        max_inflight=cluster.max_inflight_per_worker,
        max_retries=cluster.max_shard_retries,
    )
    now = index.committed()
    lost = [sid for sid, file in done.items() if now[sid].file != file]
    if lost:
        # Another repair replaced the same bad attempt first: its file is as good as ours.
        log.info("shards %s were repaired concurrently by another job; kept theirs", lost)
    return {sid: now[sid].file for sid in sorted(done)}
