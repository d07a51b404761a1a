"""Connecting to Ray: embedded by default, an existing cluster when an address is given
(`runtime.reach` checks first that one is there)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray._private import auto_init_hook

from grass_dist.config import ClusterConfig, JobConfig
from grass_dist.runtime import embedded
from grass_dist.runtime.reach import check_reachable, unreachable

log = logging.getLogger(__name__)

# Held while a thread starts Ray (`connect`, or a caller that starts other threads first and
# then connects, as grass_dist.launch.door): another thread's `connect` meanwhile waits for it.
CONNECTING = threading.RLock()
# Set once this process is stopping (Ctrl-C or SIGTERM, grass_dist.launch): a job thread
# that is still running must not start a Ray of its own while the job's Ray stops.
STOPPING = threading.Event()


def connect(cfg: ClusterConfig) -> bool:
    """Start an embedded Ray (address null) or join `cfg.address` ('auto', ray://...);
    True when this call started or joined it (False: Ray was already initialized).

    This module imports no torch, so a job door can start Ray before it imports the rest
    (grass_dist.launch), while another thread prepares the job and connects here too. A
    thread other than the main one, while the main thread starts Ray on request
    (`OnRequest`), asks it to and waits.
    """
    asked = _ON_REQUEST
    if asked is not None and threading.current_thread() is not threading.main_thread():
        return asked.ask()
    with CONNECTING:
        if ray.is_initialized():
            return False
        if STOPPING.is_set():
            raise RuntimeError("not starting Ray: this process is stopping")
        with embedded.keeping_sigterm():
            _start(cfg)
    return True


class OnRequest:
    """An embedded Ray of `cfg` that the main thread starts only once another thread of
    the job asks for one (`connect`): a job whose driver computes every shard itself
    (`driver_alone`) may need none. Ray's processes die with the thread that started them,
    so the main thread, which outlives the job's, starts it (`serve`, between its waits
    for the job) while the asking thread waits. `started`: whether it did (or the door,
    which starts one at once for other jobs)."""

    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.started = False
        self._asked, self._answered = threading.Event(), threading.Event()
        self._error: Exception | None = None

    def request(self) -> None:
        """From a job's thread: have the main thread start Ray, without waiting for it."""
        self._asked.set()

    def ask(self) -> bool:
        """From a job's thread: `connect`'s answer, once the main thread has started Ray."""
        if not self._answered.is_set():
            self.request()
            self._answered.wait()
        if self._error is not None:
            raise self._error
        return self.started

    def serve(self) -> None:
        """On the main thread: start Ray if a thread asked for it and none did yet."""
        if not self._asked.is_set() or self._answered.is_set():
            return
        try:
            self.started = connect(self.cfg)  # on the main thread: starts it here
        except Exception as e:
            self._error = e
        except BaseException:  # Ctrl-C, SIGTERM: the process stops
            self._error = RuntimeError("not starting Ray: this process is stopping")
            raise
        finally:
            self._answered.set()


_ON_REQUEST: OnRequest | None = None
_DEFERRED: tuple[ClusterConfig] | None = None  # (the job's settings,) in on_request, on_call


def on_request_active() -> bool:
    """Whether this job's Ray starts only when a call needs one (`on_request`, `on_call`)."""
    return _DEFERRED is not None


def request_soon() -> None:
    """Ask, without waiting, for the Ray of a job whose Ray starts on request: a job that
    will need one has the main thread start it while the driver goes on."""
    if _ON_REQUEST is not None:
        _ON_REQUEST.request()


@contextmanager
def on_request(ray_start: OnRequest) -> Iterator[OnRequest]:
    """A job's `connect` calls, inside, ask `ray_start`'s main thread for its Ray; so does
    a Ray call made before it started (Ray's own start on first use would start a Ray of
    its default settings on the calling thread)."""
    global _ON_REQUEST
    _ON_REQUEST = ray_start
    try:
        with _deferred(ray_start.cfg):
            yield ray_start
    finally:
        _ON_REQUEST = None


@contextmanager
def on_call(cfg: ClusterConfig) -> Iterator[None]:
    """`on_request` for a job run on its caller's thread (the Python API's): a call that
    needs Ray starts it there and then, with the job's settings (`connect`)."""
    with _deferred(cfg):
        yield


@contextmanager
def _deferred(cfg: ClusterConfig) -> Iterator[None]:
    """Inside, the job defers its Ray to the first call that needs it (`on_request_active`),
    and a Ray call made before it started connects with the job's settings `cfg`."""
    global _DEFERRED
    ray_own = auto_init_hook.auto_init_ray

    def ask() -> None:
        if auto_init_hook.enable_auto_connect and not ray.is_initialized():
            connect(cfg)

    _DEFERRED, auto_init_hook.auto_init_ray = (cfg,), ask
    try:
        yield
    finally:
        _DEFERRED, auto_init_hook.auto_init_ray = None, ray_own


def driver_computes(cfg: JobConfig) -> bool:
    """What `local_shard.wanted` asks of the config (it also needs a machine without
    CUDA): `cluster.driver_shard`, an embedded Ray, and no injected faults (they are aimed
    at workers)."""
    return (
        cfg.cluster.driver_shard
        and cfg.cluster.address is None
        and cfg.faults.kill_worker_after_rows is None
        and cfg.faults.shard_delay_s == 0
    )


def driver_member(cfg: JobConfig) -> bool:
    """`driver_computes`, with a pool that would not grow (`cluster.max_workers` null or at
    most `num_workers`): what `local_shard.member` asks of the config. The driver is then
    one of the job's `num_workers` computing processes, and Ray starts the others."""
    c = cfg.cluster
    return driver_computes(cfg) and (c.max_workers or c.num_workers) <= c.num_workers


def driver_alone(cfg: JobConfig) -> bool:
    """`driver_member` with `cluster.num_workers` 1: the driver is the job's one computing
    process (what `local_shard.alone` asks of the config)."""
    return driver_member(cfg) and cfg.cluster.num_workers == 1


def _start(cfg: ClusterConfig) -> None:
    if cfg.address is None:
        embedded.start(cfg)  # address="local": a fresh Ray here, even beside a cluster
        log.info("started an embedded Ray with %s CPUs", ray.cluster_resources().get("CPU"))
    else:
        check_reachable(cfg.address)
        try:
            ray.init(address=cfg.address, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise unreachable(cfg.address, str(e)) from None
        log.info("joined the Ray cluster at %s", cfg.address)


def shutdown() -> None:
    """Stop the embedded Ray (or leave the joined cluster) now, as a job process ends.

    Ray's own exit hook does the same but first sleeps 0.5 s for late worker messages; a
    job that returned has none left to print. Ray stops its processes one after another,
    each given 1 s to exit on SIGTERM, and its autoscaler monitor always takes that whole
    second: an embedded Ray is one node with nothing to scale, so its monitor is killed first.
    """
    if not ray.is_initialized():
        return
    node = own_node()
    if node is not None and node.is_head() and hasattr(node, "kill_monitor"):
        node.kill_monitor(check_alive=False)
    ray.shutdown()


def own_node() -> Any:
    """Ray's private handle of the node this process started (None when it joined one),
    read defensively so that a Ray without it only loses what it serves."""
    node = getattr(getattr(ray, "_private", None), "worker", None)
    return getattr(node, "_global_node", None)


def embedded_lost() -> bool:
    """Whether a process of the Ray this process started has exited (its GCS, raylet, log
    monitor, ...; one `kill_monitor` stopped does not count). Ray's processes share this
    process's process group, so a signal to the whole group (`kill -TERM -- -PGID`,
    systemd's KillMode=control-group) stops them with it: nothing can be asked of that Ray
    any more, and a call that waits on it (deleting a Serve application) waits for good.
    False where it cannot tell."""
    node = own_node()
    try:
        dead = node.dead_processes() if node is not None else []
    except Exception:  # noqa: BLE001 - a Ray without it: as if alive
        return False
    return bool(dead)


def shutdown_unless_lost(poll_s: float = 0.2) -> bool:
    """`shutdown`, unless the embedded Ray is or turns out lost (`embedded_lost`), which
    would hold it for good: then this returns True at once, with Ray's shutdown left to the
    process's exit. False once Ray stopped."""
    if embedded_lost():
        return True
    stopping = threading.Thread(target=shutdown, name="ray-shutdown", daemon=True)
    stopping.start()
    while stopping.is_alive():
        stopping.join(poll_s)
        if embedded_lost():
            return True
    return False


def resources() -> dict[str, float]:
    """`ray.cluster_resources()`; or, in a job whose embedded Ray starts on request
    (`on_request`, `on_call`) and has not, those it would have: `cluster.num_cpus`, else
    the CPUs Ray counts itself, and no GPUs (such a job runs on a machine without them). A
    reducer in the driver shares them out as it would on that Ray (its thread counts: the
    same bits)."""
    deferred = _DEFERRED
    if deferred is not None and not ray.is_initialized():
        cpus = deferred[0].num_cpus
        return {"CPU": float(cpus if cpus is not None else ray._private.utils.get_num_cpus())}
    return ray.cluster_resources()


def this_machine_only() -> bool:
    """Whether the job's cluster is this machine alone: no Ray yet (an embedded one would
    start here), or a Ray of one node, the driver's."""
    if not ray.is_initialized():
        return True
    alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    return alive == [ray.get_runtime_context().get_node_id()]


def threads_for(cpus: float) -> int:
    """Torch threads for an actor given `cpus` logical CPUs (never more than the machine)."""
    return max(1, min(int(cpus), os.cpu_count() or 1))


AUTO_LANES_UP_TO = 4  # threads per worker for which cpu_lanes=null means one lane per thread


def lanes_for(cfg: ClusterConfig, threads: int) -> int:
    """Batches a CPU worker (or the driver computing as one) of `threads` torch threads
    computes at once: `cluster.cpu_lanes`, at most one per thread; null: one per thread up
    to AUTO_LANES_UP_TO threads (each lane on one thread), else 1."""
    if cfg.cpu_lanes is not None:
        return max(1, min(cfg.cpu_lanes, threads))
    return threads if threads <= AUTO_LANES_UP_TO else 1


def idle_cpus(cfg: ClusterConfig, workers: int | None = None) -> float:
    """CPUs of the cluster that `workers` of the job's workers (default
    `cluster.num_workers`) leave to others. From what the workers ask for and the cluster's
    total, not from Ray's view of what is free now, which lags actors that just started
    or stopped."""
    n = cfg.num_workers if workers is None else workers
    return ray.cluster_resources().get("CPU", 0) - n * cfg.cpus_per_worker


def map_tasks(cfg: ClusterConfig) -> int:
    """Map tasks over committed shards (preconditioner, damping sweep, repair scan): one
    per worker, at least two so that reading one shard overlaps computing on another."""
    return max(2, cfg.num_workers)
