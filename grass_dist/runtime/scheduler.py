"""Dispatch work items to a pool of actors with backpressure and retries on actor death.

Policy: each actor has at most `max_inflight` items queued; an item whose actor died is
retried on another actor (up to `max_retries` times) and the dead actor is replaced. An
error raised by the work itself (bad data, NaN gradients) is not retried: it fails the job.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from grass_dist.errors import ShardFailedError

log = logging.getLogger(__name__)
T = TypeVar("T")

_ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


class ActorPool:
    """A fixed number of actor slots; a dead actor's slot gets a fresh actor."""

    def __init__(self, factory: Callable[[int], Any], size: int):
        self.factory = factory
        self.created = 0
        self.actors = [self._new() for _ in range(size)]

    def _new(self) -> Any:
        self.created += 1
        return self.factory(self.created - 1)

    def replace(self, slot: int) -> None:
        with contextlib.suppress(Exception):  # already gone
            ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new()

    def shutdown(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)


def run_items(
    pool: ActorPool,
    items: Sequence[T],
    submit: Callable[[Any, T], ray.ObjectRef],
    on_done: Callable[[list[tuple[T, Any]]], None],
    *,
    describe: Callable[[T], str] = str,
    max_inflight: int = 2,
    max_retries: int = 3,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Run `submit(actor, item)` for every item; `on_done` gets finished (item, result) batches.

    Items must be hashable (attempts are counted per item).
    """
    pending: deque[T] = deque(items)
    inflight: dict[ray.ObjectRef, tuple[T, Any]] = {}
    failures: dict[T, int] = {}

    def load(actor: Any) -> int:
        return sum(1 for _, a in inflight.values() if a is actor)

    while pending or inflight:
        for actor in pool.actors:
            while pending and load(actor) < max_inflight:
                item = pending.popleft()
                inflight[submit(actor, item)] = (item, actor)
        ready, _ = ray.wait(list(inflight), num_returns=1)
        ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0)
        done = []
        for ref in ready:
            item, actor = inflight.pop(ref)
            try:
                done.append((item, ray.get(ref)))
            except _ACTOR_LOST as e:
                failures[item] = failures.get(item, 0) + 1
                if failures[item] > max_retries:
                    raise ShardFailedError(
                        f"{describe(item)} failed {failures[item]} times because its worker "
                        f"died ({type(e).__name__}); raise cluster.max_shard_retries or check "
                        f"the worker logs"
                    ) from e
                log.warning(
                    "retrying %s on another worker: its worker died (%s)",
                    describe(item),
                    type(e).__name__,
                )
                if actor in pool.actors:
                    slot = pool.actors.index(actor)
                    log.warning("replacing the dead worker in slot %d with a new actor", slot)
                    pool.replace(slot)
                pending.appendleft(item)
            except RayTaskError as e:
                raise e.as_instanceof_cause() from None
        if done:
            on_done(done)
            if progress is not None:
                progress(len(done))
