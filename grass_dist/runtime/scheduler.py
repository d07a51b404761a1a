"""Dispatch work items to a worker pool with backpressure and retries on worker death.

Policy: items go one at a time to the least loaded ready worker, which holds at most
`max_inflight` in flight, and a second one only while more items wait than workers are
starting (two shards, one worker ready and one starting: each gets a shard, rather than the
first both). An item whose worker died is retried on another worker (up to `max_retries`
times) and the pool replaces the dead worker. An error raised by the work itself (bad data,
NaN gradients) is not retried: it fails the job. The loop wakes at least every `tick_s`
seconds so the pool can admit new workers and grow, and `on_tick` can report progress,
even while no item finishes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray
from ray.exceptions import RayTaskError

from grass_dist.errors import ShardFailedError
from grass_dist.runtime.executors import settle
from grass_dist.runtime.pool import ACTOR_LOST, ActorPool

log = logging.getLogger(__name__)
T = TypeVar("T")


def run_items(
    pool: ActorPool,
    items: Sequence[T],
    submit: Callable[[Any, T], ray.ObjectRef],
    on_done: Callable[[list[tuple[T, Any]]], None],
    *,
    describe: Callable[[T], str] = str,
    max_inflight: int = 2,
    max_retries: int = 3,
    on_tick: Callable[[], None] | None = None,
    tick_s: float = 1.0,
) -> None:
    """Run `submit(actor, item)` for every item; `on_done` gets finished (item, result) batches.

    Items must be hashable (attempts are counted per item).
    """
    pending: deque[T] = deque(items)
    inflight: dict[ray.ObjectRef, tuple[T, Any]] = {}
    failures: dict[T, int] = {}

    def load(actor: Any) -> int:
        return sum(1 for _, a in inflight.values() if a is actor)

    try:
        while pending or inflight:
            pool.tick()
            while pending and pool.actors:
                actor = min(pool.actors, key=load)  # one item at a time to the least loaded
                busy = load(actor)
                if busy >= max_inflight or (busy and len(pending) <= len(pool.starting)):
                    break  # full, or the rest is for the workers starting: none idles at the end
                item = pending.popleft()
                inflight[submit(actor, item)] = (item, actor)
            waitables = [*inflight, *pool.waitables()]
            if waitables:
                ray.wait(waitables, num_returns=1, timeout=tick_s)
            else:
                time.sleep(tick_s)  # nothing placed yet; the pool's tick raises on timeout
            ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0)
            done = []
            for ref in ready:
                item, actor = inflight.pop(ref)
                try:
                    done.append((item, ray.get(ref)))
                except ACTOR_LOST as e:
                    failures[item] = failures.get(item, 0) + 1
                    who = pool.where(actor)
                    if failures[item] > max_retries:
                        raise ShardFailedError(
                            f"{describe(item)} failed {failures[item]} times because its worker "
                            f"died ({type(e).__name__}); raise cluster.max_shard_retries or check "
                            f"the worker logs"
                        ) from e
                    log.warning(
                        "retrying %s on another worker (attempt %d of %d): %s died (%s)",
                        describe(item),
                        failures[item] + 1,
                        max_retries + 1,
                        who,
                        type(e).__name__,
                    )
                    pool.lost(actor, e)
                    pending.appendleft(item)
                except RayTaskError as e:
                    raise e.as_instanceof_cause() from None
            if done:
                on_done(done)
            if on_tick is not None:
                on_tick()
    except BaseException:
        settle(list(inflight))
        inflight.clear()
        raise
