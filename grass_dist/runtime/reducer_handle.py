"""The driver's side of the reducer: which kind a job gets, starting it, and retrying a
stage on a new one when it dies.

A job's reducer (`runtime.reducer.Reducer`) is an actor, or, for a small index
(`reduces_in_driver`), an object of the driver whose map calls run in the driver's own
process. `ReducerHandle` hides which from the pipeline's stages; `KeptReducer` keeps one from a job
to the next of the Python API's `Index`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ray

from grass_dist.assembly import retry_policy
from grass_dist.config import JobConfig
from grass_dist.errors import ReducerFailedError
from grass_dist.gradients.computer import PhiBlock
from grass_dist.runtime.cluster import idle_cpus, map_tasks
from grass_dist.runtime.fisher import start_process
from grass_dist.runtime.pool import ACTOR_LOST
from grass_dist.runtime.reducer import Reducer, ScoreRequest

if TYPE_CHECKING:
    from grass_dist.job import Job  # which imports this module

log = logging.getLogger(__name__)


def _arguments(cfg: JobConfig) -> tuple[Any, ...]:
    """A reducer's arguments for a job of `cfg`: index URL, store options, map tasks, the
    store's retry policy, faults."""
    tasks, retry = map_tasks(cfg.cluster), retry_policy(cfg.store)
    return cfg.index_url, cfg.store.storage_options, tasks, retry, cfg.faults


def reduces_in_driver(cfg: JobConfig, layers: dict[str, int], rows: int) -> bool:
    """Whether a job's reducer is an object of the driver rather than an actor: when the
    index's gradients (`rows` x the `layers`' dimensions, float32) and its preconditioner
    (a float64 k x k matrix per layer) take at most `cluster.driver_reduce_mib`, and no
    fault is to kill the reducer. Its stages then take milliseconds, and an actor's process
    would take seconds to start."""
    if cfg.faults.kill_reducer_during is not None:
        return False
    need = 4 * rows * sum(layers.values()) + 8 * sum(k * k for k in layers.values())
    return need <= cfg.cluster.driver_reduce_mib * (1 << 20)


class ReducerHandle:
    """Driver side of the reducer: starts the actor, and a new one when it dies mid-stage;
    or, `in_driver`, holds the reducer as an object of this process (`reduces_in_driver`).

    A stage retried on a new reducer starts again from the store: the committed shards, and
    the saved preconditioner when scoring. Results become visible only through their
    `_COMPLETE.json`, so a reducer that dies mid-write leaves nothing half-read.
    """

    def __init__(self, cfg: JobConfig, in_driver: bool = False):
        self.cfg = cfg
        self.in_driver = in_driver
        self.actor: Any = None  # the actor, or the Reducer itself in_driver
        self.started = 0
        self.warmed = 0  # map-task processes started ahead of the reducer's first tasks
        self.ray_job: str | None = None  # the Ray session (its driver's job id) of `actor`

    def serves(self, cfg: JobConfig, in_driver: bool) -> bool:
        """Whether its running reducer can serve a job of `cfg` too: of the same kind
        (`in_driver`), started in this Ray session with the same arguments (index, store
        options and retries, map tasks, faults) as a reducer of `cfg` would be."""
        return (
            self.actor is not None
            and self.in_driver == in_driver
            and ray.is_initialized()
            and self.ray_job == ray.get_runtime_context().get_job_id()
            and _arguments(self.cfg) == _arguments(cfg)
        )

    def start(self, reason: str) -> None:
        """Start the reducer now, unless one runs (a stage starts one when needed)."""
        if self.actor is None:
            self._start(reason)

    def _start(self, reason: str) -> None:
        self.started += 1
        url, options, parallelism, retry, faults = _arguments(self.cfg)
        self.ray_job = ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
        if self.in_driver:
            log.info("the driver reduces the index itself (cluster.driver_reduce_mib)")
            self.actor = Reducer(url, options, parallelism, retry, faults, inline=True)
            return
        log.info("starting reducer %d: %s", self.started, reason)
        self.actor = (
            ray.remote(Reducer)
            .options(num_cpus=0, max_restarts=0)
            .remote(url, options, parallelism, retry=retry, faults=faults)
        )
        if idle_cpus(self.cfg.cluster) >= 1:
            # Its map tasks' processes start now too, on the idle CPUs. Not when the job's
            # workers hold them all: they are lent to the stages, and processes for tasks
            # would start only once the workers stop, for nothing.
            for _ in range(parallelism):  # after the actor: it takes a process Ray started
                start_process.remote()
            self.warmed += parallelism

    def precondition(
        self,
        name: str,
        verify: bool,
        damping: float | str | None = None,
        workers: Sequence[Any] = (),
    ) -> dict[str, Any]:
        """`Reducer.build_preconditioner`, on a new reducer if this one dies; raises
        `WorkersLostError` if one of the lent `workers` dies."""
        return self._retried("build_preconditioner", name, verify, damping, workers=workers)

    def score(
        self, query: PhiBlock, req: ScoreRequest, workers: Sequence[Any] = ()
    ) -> dict[str, Any]:
        """`Reducer.score`, on a new reducer if this one dies; raises `WorkersLostError` if
        one of the lent `workers` dies."""
        return self._retried("score", query, req, workers=workers)

    def _retried(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """The reducer's `method(*args, **kwargs)`, retried on a new reducer if this one
        dies (an actor's; one in the driver dies with it)."""
        stage = "precondition" if method == "build_preconditioner" else method
        if self.in_driver:
            self.start(f"stage {stage} needs one")
            return getattr(self.actor, method)(*args, **kwargs)
        attempts = self.cfg.cluster.max_reducer_restarts + 1
        for attempt in range(1, attempts + 1):
            if self.actor is None:
                self._start(f"stage {stage} needs one")
            try:
                return ray.get(getattr(self.actor, method).remote(*args, **kwargs))
            except ACTOR_LOST as e:
                self.actor = None
                if attempt == attempts:
                    raise ReducerFailedError(
                        f"the reducer died {attempts} times during stage {stage} "
                        f"({type(e).__name__}); check the reducer's logs, or raise "
                        "cluster.max_reducer_restarts"
                    ) from e
                log.warning(
                    "retrying stage %s on a new reducer (attempt %d of %d): the reducer died "
                    "(%s); it resumes from the store",
                    stage,
                    attempt + 1,
                    attempts,
                    type(e).__name__,
                )
        raise AssertionError("unreachable")

    def shutdown(self) -> None:
        if self.in_driver:
            self.actor = None
        elif self.actor is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.actor, no_restart=True)
            self.actor = None


class KeptReducer:
    """A reducer kept running from one job to the next of one caller (the Python API's
    `Index`, whose `attribute` calls are jobs): a job whose reducer would be started with
    the same arguments (`ReducerHandle.serves`) uses it, and no process starts. The
    reducer's cache holds the loaded preconditioner; its stages read everything else from
    the store anew, and check the preconditioner against the shards committed now."""

    def __init__(self) -> None:
        self.handle: ReducerHandle | None = None

    def lend(self, job: Job) -> None:
        """Give `job` the kept reducer where it serves it; else stop it."""
        handle, self.handle = self.handle, None
        if handle is not None and handle.serves(job.cfg, job.reduces_in_driver()):
            handle.cfg = job.cfg
            job._reducer = handle
        elif handle is not None:
            handle.shutdown()

    def take_back(self, job: Job) -> None:
        self.handle, job._reducer = job._reducer, None

    def close(self) -> None:
        """Stop the kept reducer (a later job starts its own)."""
        if self.handle is not None:
            self.handle.shutdown()
            self.handle = None
