"""Dispatch work items to a worker pool with backpressure and retries on worker death.

Policy: items go one at a time to the least loaded ready worker, which holds at most
`max_inflight` in flight, and a second one only while more items wait than workers are
starting (two shards, one worker ready and one starting: each gets a shard, rather than the
first both). Items may come from a queue that another taker shares (`SharedItems`: the
driver's own shards, where the driver is one of the job's computing processes): a worker
then holds a second one only while more wait than there are takers, so that none is held
back at the end while the driver could compute it. An item whose worker died is retried on
another worker (up to `max_retries` times) and the pool replaces the dead worker. An error
raised by the work itself (bad data, NaN gradients) is not retried: it fails the job. The
loop wakes at least every `tick_s` seconds so the pool can admit new workers and grow, and
`on_tick` can report progress, even while no item finishes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import ray
from ray.exceptions import RayTaskError

from grass_dist.errors import ShardFailedError
from grass_dist.runtime.executors import settle
from grass_dist.runtime.pool import ACTOR_LOST, ActorPool

log = logging.getLogger(__name__)
T = TypeVar("T")


class SharedItems(Generic[T]):
    """Items that another taker takes from too: `take()` hands out the next one (None when
    none is left) and `left()` counts those not taken yet."""

    def __init__(self, take: Callable[[], T | None], left: Callable[[], int]):
        self.take, self.left = take, left


def run_items(
    pool: ActorPool,
    items: Sequence[T] | SharedItems[T],
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
    run = _Dispatch(pool, items, submit, describe, max_inflight, max_retries)
    try:
        while run.waiting() or run.inflight:
            pool.tick()
            run.fill()
            waitables = [*run.inflight, *pool.waitables()]
            if waitables:
                ray.wait(waitables, num_returns=1, timeout=tick_s)
            else:
                time.sleep(tick_s)  # nothing placed yet; the pool's tick raises on timeout
            done = run.collect()
            if done:
                on_done(done)
            if on_tick is not None:
                on_tick()
    except BaseException:
        settle(list(run.inflight))
        run.inflight.clear()
        raise


class _Dispatch:
    """`run_items`' state: the items waiting, those in flight (with their actors) and the
    attempts of each item whose worker died."""

    def __init__(
        self,
        pool: ActorPool,
        items: Sequence[T] | SharedItems[T],
        submit: Callable[[Any, T], ray.ObjectRef],
        describe: Callable[[T], str],
        max_inflight: int,
        max_retries: int,
    ):
        self.pool, self.submit, self.describe = pool, submit, describe
        self.max_inflight, self.max_retries = max_inflight, max_retries
        self.shared = items if isinstance(items, SharedItems) else None
        self.pending: deque[T] = deque() if self.shared else deque(items)  # and retries
        self.inflight: dict[ray.ObjectRef, tuple[T, Any]] = {}
        self.failures: dict[T, int] = {}

    def load(self, actor: Any) -> int:
        return sum(1 for _, a in self.inflight.values() if a is actor)

    def waiting(self) -> int:
        """Items not handed out yet (those another taker may still take included)."""
        return len(self.pending) + (self.shared.left() if self.shared else 0)

    def fill(self) -> None:
        """Submit items, one at a time to the least loaded ready worker, while one has room."""
        while (waiting := self.waiting()) and self.pool.actors:
            actor = min(self.pool.actors, key=self.load)
            busy = self.load(actor)
            takers = len(self.pool.actors) + 1 if self.shared else 0  # the other one too
            others = len(self.pool.starting) + takers
            if busy >= self.max_inflight or (busy and waiting <= others):
                break  # full, or the rest is for the other takers: none idles at the end
            item = self.pending.popleft() if self.pending else self.shared.take()
            if item is None:
                break  # the other taker took the last
            self.inflight[self.submit(actor, item)] = (item, actor)

    def collect(self) -> list[tuple[T, Any]]:
        """The items finished by now, with their results; an item whose worker died goes
        back to the front of the queue (`retry`), and an error of the work itself is raised."""
        ready, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
        done = []
        for ref in ready:
            item, actor = self.inflight.pop(ref)
            try:
                done.append((item, ray.get(ref)))
            except ACTOR_LOST as e:
                self.retry(item, actor, e)
            except RayTaskError as e:
                raise e.as_instanceof_cause() from None
        return done

    def retry(self, item: T, actor: Any, e: Exception) -> None:
        """`item`'s worker died: replace it and queue the item first, or fail the job once
        the item's worker died more than `max_retries` times."""
        self.failures[item] = self.failures.get(item, 0) + 1
        who = self.pool.where(actor)
        if self.failures[item] > self.max_retries:
            raise ShardFailedError(
                f"{self.describe(item)} failed {self.failures[item]} times because its worker "
                f"died ({type(e).__name__}); raise cluster.max_shard_retries or check "
                f"the worker logs"
            ) from e
        log.warning(
            "retrying %s on another worker (attempt %d of %d): %s died (%s)",
            self.describe(item),
            self.failures[item] + 1,
            self.max_retries + 1,
            who,
            type(e).__name__,
        )
        self.pool.lost(actor, e)
        self.pending.appendleft(item)
