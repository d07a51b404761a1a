"""The worker pool: actors are placed, replaced when they die, grown when resources appear.

A new actor is `starting` until its start call answers (placed, model built: `describe()`
by default); only then does it get work, so a worker waiting for resources (a lost node's
replacement, more workers than the cluster holds) never holds shards hostage. Every
decision is logged with its reason.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from grass_dist.errors import PlacementTimeoutError, WorkerStartError
from grass_dist.runtime import scaling

log = logging.getLogger(__name__)

ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


def _on_node(error_msg: str) -> str:
    """' on node <ip>' from Ray's text of a call that raised in an actor, or of an actor that
    died in its creation task (it starts `ray::Class.method() (pid=..., ip=...)`), so an
    error names the node to fix; '' where it says none."""
    found = re.search(r"\bip=([^,)\s]+)", error_msg)
    return f" on node {found.group(1)}" if found else ""


@dataclass
class Member:
    """One worker actor of the pool."""

    actor: Any
    worker_id: int
    since: float  # time.monotonic() when it was started
    info: dict[str, Any] | None = None  # describe() once ready

    def where(self) -> str:
        node = (self.info or {}).get("node_id", "?")
        return f"worker {self.worker_id} on node {node[:12]}"


class ActorPool:
    """Actors made by `factory(worker_id)`, each ready once `start(actor)` answers.

    Args:
        size: workers started at once (`cluster.num_workers`).
        start: the call that makes an actor ready and returns its description (a dict with
            node_id and device); default `actor.describe.remote()`.
        spares: actors `factory` made earlier (worker ids 0, 1, ...), used before new ones:
            they were started while the driver prepared the job.
        max_size: elastic ceiling (`cluster.max_workers`); None = `size`.
        request: resources one worker asks for, to judge whether another one fits.
        scale_check_s: seconds between growth checks.
        placement_timeout_s: fail when no worker is ready for this long.
    """

    def __init__(
        self,
        factory: Callable[[int], Any],
        size: int,
        *,
        start: Callable[[Any], ray.ObjectRef] | None = None,
        spares: list[Any] | None = None,
        max_size: int | None = None,
        request: dict[str, float] | None = None,
        scale_check_s: float = 2.0,
        placement_timeout_s: float = 600.0,
    ):
        self.factory = factory
        self.start = start or (lambda actor: actor.describe.remote())
        self.spares = list(spares or [])
        self.max_size = max(size, max_size or size)
        self.request = dict(request or {})
        self.scale_check_s = scale_check_s
        self.placement_timeout_s = placement_timeout_s
        self.created = 0
        self.ready: list[Member] = []
        self.starting: dict[ray.ObjectRef, Member] = {}
        self.gone: list[Member] = []
        self._said: set[str] = set()
        self._last_check = time.monotonic()
        self._last_reason = ""
        self._idle_since = time.monotonic()
        for _ in range(size):
            self._spawn(f"initial pool of {size} (cluster.num_workers)")
        for actor in self.spares:  # more spares than workers: not needed
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.spares.clear()

    # ---- membership ------------------------------------------------------------------
    @property
    def actors(self) -> list[Any]:
        """Actors that are placed and ready for work."""
        return [m.actor for m in self.ready]

    def member(self, actor: Any) -> Member | None:
        """The ready member holding `actor`, if any."""
        return next((m for m in self.ready if m.actor is actor), None)

    def where(self, actor: Any) -> str:
        """'worker 3 on node abc...' for a ready or lost actor (for log messages)."""
        found = next((m for m in [*self.ready, *self.gone] if m.actor is actor), None)
        return found.where() if found else "an unknown worker"

    def waitables(self) -> list[ray.ObjectRef]:
        """Refs that resolve when a starting worker becomes ready (for ray.wait)."""
        return list(self.starting)

    def _spawn(self, reason: str) -> None:
        actor = self.spares.pop(0) if self.spares else self.factory(self.created)
        member = Member(actor, self.created, time.monotonic())
        self.created += 1
        self.starting[self.start(actor)] = member
        log.info("starting worker %d: %s", member.worker_id, reason)

    def lost(self, actor: Any, error: BaseException) -> None:
        """`actor` died: drop it and start a replacement (which waits for resources)."""
        member = self.member(actor)
        if member is None:
            return  # already handled for another of its calls
        self.ready.remove(member)
        self.gone.append(member)
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
        self._spawn(f"replaces {member.where()}, which died ({type(error).__name__})")

    def wait_ready(self, minimum: int = 1, unless: Callable[[], bool] | None = None) -> bool:
        """Block until `minimum` workers are ready (the rest join whenever they are placed),
        or until `unless()` says the caller needs none after all: whether they are."""
        while len(self.ready) < minimum:
            if unless is not None and unless():
                return False
            if self.starting:
                ray.wait(list(self.starting), num_returns=1, timeout=1.0 if unless is None else 0.2)
            else:
                time.sleep(0.2)
            self.tick()
        devices = sorted({str((m.info or {}).get("device")) for m in self.ready})
        log.info(
            "%d of %d workers ready on %s; %d still starting",
            len(self.ready),
            len(self.ready) + len(self.starting),
            ", ".join(devices),
            len(self.starting),
        )
        return True

    # ---- periodic work ---------------------------------------------------------------
    def tick(self) -> None:
        """Admit workers that became ready, grow if resources appeared, watch placement."""
        self.admit()
        now = time.monotonic()
        if self.ready:
            self._idle_since = now
        elif now - self._idle_since > self.placement_timeout_s:
            raise PlacementTimeoutError(
                f"no worker could be placed for {self.placement_timeout_s:.0f} s (each needs "
                f"{self.request}; cluster has {ray.cluster_resources()}): add nodes, lower "
                "cluster.cpus_per_worker / gpus_per_worker, or raise cluster.placement_timeout_s"
            )
        if self.max_size > len(self.ready) + len(self.starting) and (
            now - self._last_check >= self.scale_check_s
        ):
            self._last_check = now
            self._maybe_grow()

    def admit(self) -> None:
        """Admit the workers that became ready since the last look (never waits)."""
        if not self.starting:
            return
        done, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
        for ref in done:
            member = self.starting.pop(ref)
            try:
                member.info = ray.get(ref)
            except ACTOR_LOST as e:
                if getattr(e, "actor_init_failed", False):
                    said = str(getattr(e, "error_msg", e))
                    last = said.strip().splitlines()[-1]
                    raise WorkerStartError(
                        f"worker {member.worker_id}{_on_node(said)} failed while starting: {last}"
                    ) from None
                self._spawn(f"replaces worker {member.worker_id}, lost while starting")
                continue
            except RayTaskError as e:  # the start call raised
                raise WorkerStartError(
                    f"worker {member.worker_id}{_on_node(str(e))} failed while starting: "
                    f"{e.cause or e}"
                ) from None
            self.ready.append(member)
            info = member.info
            log.info(
                "%s is ready after %.1f s (device %s, GPUs %s, %s batch(es) at once)",
                member.where(),
                time.monotonic() - member.since,
                info.get("device"),
                info.get("gpu_ids") or "none",
                info.get("lanes", 1),
            )
            note = info.get("device_note")
            if note and "device_note" not in self._said:
                self._said.add("device_note")  # once per job, not once per worker
                log.warning("%s %s", member.where(), note)

    def _maybe_grow(self) -> None:
        decision = scaling.grow(
            len(self.ready) + len(self.starting),
            self.max_size,
            ray.available_resources(),
            self.request,
        )
        if decision.add == 0:
            if decision.reason != self._last_reason:  # say it when it changes, not every tick
                log.info("not growing the worker pool: %s", decision.reason)
            self._last_reason = decision.reason
            return
        self._last_reason = ""
        for _ in range(decision.add):
            self._spawn(decision.reason)

    def shutdown(self) -> None:
        for actor in [m.actor for m in self.ready] + [m.actor for m in self.starting.values()]:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.ready.clear()
        self.starting.clear()
