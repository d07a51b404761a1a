"""Where the reducer's map work runs: Ray tasks, or the job's idle worker actors.

Each map call (a Fisher partial sum, a layer's factorisation, a scorer) is a function of
module level run in some process of the cluster. By default that is a Ray task, in a
process Ray starts (and which imports torch) on first use. Once the index is built, the
job's worker actors sit idle while holding the cluster's CPUs; lent to the reducer
(`Executor(workers)`), they run the same calls in their own processes, already started
and importing nothing, so no stage waits for new processes. Either way the calls, their
grouping and their order are the same, and so are the answers, bit for bit.

A lent worker that dies fails the stage with `WorkersLostError`; the driver then stops the
workers and runs the stage again on Ray tasks (`grass_dist.pipeline`).

A reducer that runs in the driver (a small index: `runtime.reducer.reduces_in_driver`) makes
the same calls in its own process, one after another (`Executor(inline=True)`): a stage of
milliseconds then waits for no process to start.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Sequence
from typing import Any

import ray
import torch

from grass_dist.runtime import compute_thread
from grass_dist.runtime.cluster import threads_for
from grass_dist.runtime.pool import ACTOR_LOST


class WorkersLostError(Exception):
    """A worker lent to a reducer stage died: run the stage again on Ray tasks."""


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so an idle
    process does not hold on to the peak of the call it ran."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_call(fn: Callable, threads: int, *args):
    """One map call's body: fn(*args) on `threads` torch threads, on this process's compute
    thread, then hand the freed memory back."""
    return compute_thread.call(_call_on, fn, threads, *args)


def _call_on(fn: Callable, threads: int, *args):
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        release_memory()


def _run_here(fn: Callable, threads: int, *args):
    """`run_call` in this process, whose torch thread count is restored after the call."""
    before = compute_thread.call(torch.get_num_threads)
    try:
        args = tuple(ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args)
        return run_call(fn, threads, *args)
    finally:
        compute_thread.call(torch.set_num_threads, before)


def local_device() -> str:
    """'cuda' where this process sees a GPU (Ray shows a task or actor only its own), else
    'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# max_calls can only be fixed at decoration: one variant per choice of fresh_process.
_TASKS = {False: ray.remote(run_call), True: ray.remote(max_calls=1)(run_call)}


class Executor:
    """Runs map calls as Ray tasks, or round-robin on `workers` (GradientWorker actors lent
    by the driver, whose `run(fn, *args)` calls fn on the worker's own threads), or with
    `inline` in this process, each as it is submitted, on the threads a task would have. A
    fan-out makes the same calls either way: how many depends on the stage, not on where
    they run."""

    def __init__(
        self,
        workers: Sequence[Any] = (),
        max_retries: int = 3,
        fresh_process: bool = False,
        inline: bool = False,
    ):
        self.workers = [] if inline else list(workers)
        self.max_retries = max_retries
        self.fresh_process = fresh_process  # tasks only: end each task's process
        self.inline = inline

    @property
    def lent(self) -> bool:
        return bool(self.workers)

    def share(self, obj: Any) -> Any:
        """`obj` as an argument of several calls: put in Ray's object store once (a ref),
        or itself for calls made in this process (`inline`, which needs no Ray)."""
        return obj if self.inline else ray.put(obj)

    def with_retries(self, max_retries: int, fresh_process: bool = False) -> Executor:
        return Executor(self.workers, max_retries, fresh_process, self.inline)

    def submit(
        self,
        i: int,
        fn: Callable,
        *args: Any,
        cpus: float = 1.0,
        threads: int | None = None,
        num_returns: int = 1,
        gpu: bool = False,
    ):
        """Call `i` of a fan-out: fn(*args) on worker i (mod the lent workers), else as a Ray
        task of `cpus` CPUs (and one GPU with `gpu`) on `threads` torch threads (default:
        one per CPU) -> its ref (`num_returns` refs)."""
        if self.inline:
            out = _run_here(fn, threads or threads_for(cpus), *args)
            return out if num_returns == 1 else list(out)
        if self.workers:
            actor = self.workers[i % len(self.workers)]
            return actor.run.options(num_returns=num_returns).remote(fn, *args)
        options: dict[str, Any] = {
            "num_cpus": cpus,
            "num_returns": num_returns,
            # Retries are for lost processes only: an exception in fn would recur.
            "max_retries": self.max_retries,
            "retry_exceptions": False,
        }
        if gpu:
            options["num_gpus"] = 1
        threads = threads or threads_for(cpus)
        return _TASKS[self.fresh_process].options(**options).remote(fn, threads, *args)

    def get(self, refs):
        """ray.get(refs) (inline: the results themselves); a lent worker's death is
        `WorkersLostError`. When one call failed, the others' errors are collected too
        (`settle`)."""
        if self.inline:
            return refs
        try:
            return ray.get(refs)
        except ACTOR_LOST as e:
            settle(refs)
            if not self.workers:
                raise
            raise WorkersLostError(
                f"a worker lent to this stage died ({type(e).__name__}): the stage runs "
                "again on Ray tasks"
            ) from None
        except Exception:
            settle(refs)
            raise


def settle(refs: Any) -> None:
    """After one of `refs` failed its stage: each gets a future that takes its result or
    error whenever it comes, and nobody asks it; Ray would otherwise print each other error
    ("Unhandled error") when its reference is dropped, in a later call's output. Nothing
    waits and nothing is cancelled: a `ray.cancel` that races the task's completion can
    crash the calling process in Ray ("Tried to complete task that was not pending")."""
    for ref in refs if isinstance(refs, (list, tuple)) else [refs]:
        ref.future()
