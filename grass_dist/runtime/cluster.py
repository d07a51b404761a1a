"""Connecting to Ray: embedded by default, an existing cluster when an address is given."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import ray

from grass_dist.config import ClusterConfig
from grass_dist.errors import ClusterUnreachableError
from grass_dist.runtime.pool import ActorPool

log = logging.getLogger(__name__)

# Held while a thread starts Ray (`connect`, or a caller that starts other threads first and
# then connects, as grass_dist.launch.door): another thread's `connect` meanwhile waits for it.
CONNECTING = threading.RLock()


def connect(cfg: ClusterConfig) -> bool:
    """Start an embedded Ray (address null) or join `cfg.address` ('auto', ray://...);
    True when this call started or joined it (False: Ray was already initialized).

    This module imports no torch, so a job door can start Ray before it imports the rest
    (grass_dist.launch), while another thread prepares the job and connects here too.
    """
    with CONNECTING:
        if ray.is_initialized():
            return False
        _start(cfg)
    return True


def _start(cfg: ClusterConfig) -> None:
    if cfg.address is None:
        # address="local" always starts a fresh Ray here, even if a cluster runs nearby.
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
        log.info("started an embedded Ray with %s CPUs", ray.cluster_resources().get("CPU"))
    else:
        try:
            ray.init(address=cfg.address, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise ClusterUnreachableError(
                f"no Ray cluster to join at cluster.address={cfg.address} ({e}): start one "
                'first (`ray start --head`; README: "On this machine with `ray start`"), '
                "give the head's address, or drop cluster=ray (cluster.address=null) to run "
                "on an embedded Ray"
            ) from None
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
    # Ray's private node handle, set when this process started the Ray; read defensively so
    # that a Ray without it only loses the shortcut.
    node = getattr(getattr(ray, "_private", None), "worker", None)
    node = getattr(node, "_global_node", None)
    if node is not None and node.is_head() and hasattr(node, "kill_monitor"):
        node.kill_monitor(check_alive=False)
    ray.shutdown()


def worker_request(cfg: ClusterConfig) -> dict[str, float]:
    """Resources one GradientWorker asks for: CPUs, `gpus_per_worker` GPUs when the cluster
    has GPUs (the default 1 puts at most one worker on each GPU), and custom resources."""
    request = {"CPU": cfg.cpus_per_worker, **(cfg.worker_resources or {})}
    if ray.cluster_resources().get("GPU", 0) > 0 and cfg.gpus_per_worker > 0:
        request["GPU"] = cfg.gpus_per_worker
    return request


def worker_options(cfg: ClusterConfig) -> dict[str, Any]:
    """Ray actor options for one GradientWorker (threaded: see runtime/overlap.py)."""
    request = worker_request(cfg)
    custom = {k: v for k, v in request.items() if k not in ("CPU", "GPU")}
    opts: dict[str, Any] = {
        "num_cpus": request["CPU"],
        "max_restarts": 0,  # the pool replaces dead workers itself, with logged reasons
        "max_concurrency": cfg.max_inflight_per_worker,
    }
    if "GPU" in request:
        opts["num_gpus"] = request["GPU"]
    if custom:
        opts["resources"] = custom
    return opts


def worker_factory(
    cfg: ClusterConfig,
    job: dict[str, Any],
    objects: dict[str, ray.ObjectRef] | None = None,
    datasets: tuple[str, ...] = (),
) -> Callable[[int], Any]:
    """`factory(worker_id)`: a GradientWorker actor for `job`, created but not yet started
    (its `start(model_hash)` builds the replica); `objects` are the job's in-memory objects
    (grass_dist.assembly.ship); `datasets` ('train', 'query') are built as the actor is
    created, before its first shard asks for them."""
    # torch, and the model code, load here and not when this module is imported: see `connect`.
    from grass_dist.runtime.worker import GradientWorker

    actor_cls = ray.remote(GradientWorker).options(**worker_options(cfg))
    threads = threads_for(cfg.cpus_per_worker)
    return lambda i: actor_cls.remote(job, None, threads, i, objects, datasets)


def start_worker_pool(
    cfg: ClusterConfig,
    job: dict[str, Any],
    model_hash: str,
    objects: dict[str, ray.ObjectRef] | None = None,
    spares: list[Any] | None = None,
) -> ActorPool:
    """Start `cfg.num_workers` GradientWorker actors (growing to `cfg.max_workers`), using
    `spares` (made by `worker_factory` for the same job, e.g. while the driver prepared it)
    first."""
    return ActorPool(
        worker_factory(cfg, job, objects),
        cfg.num_workers,
        start=lambda actor: actor.start.remote(model_hash),
        spares=spares,
        max_size=cfg.max_workers,
        request=worker_request(cfg),
        scale_check_s=cfg.scale_check_s,
        placement_timeout_s=cfg.placement_timeout_s,
    )


def threads_for(cpus: float) -> int:
    """Torch threads for an actor given `cpus` logical CPUs (never more than the machine)."""
    return max(1, min(int(cpus), os.cpu_count() or 1))


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
