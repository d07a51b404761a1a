"""Placing the job's workers on its Ray: what each GradientWorker asks for, whether the
cluster could ever place one (`check_placeable`, before anything is written), and the
actors and pool that run them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from grass_dist.config import ClusterConfig
from grass_dist.errors import ConfigError
from grass_dist.runtime.cluster import own_node, threads_for
from grass_dist.runtime.pool import ActorPool


def worker_request(cfg: ClusterConfig, have: dict[str, float] | None = None) -> dict[str, float]:
    """Resources one GradientWorker asks for: CPUs, `gpus_per_worker` GPUs when the cluster
    (`have`, default Ray's) has GPUs (the default 1 puts at most one worker on each GPU), and
    custom resources."""
    request = {"CPU": cfg.cpus_per_worker, **(cfg.worker_resources or {})}
    have = ray.cluster_resources() if have is None else have
    if have.get("GPU", 0) > 0 and cfg.gpus_per_worker > 0:
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


def check_placeable(cfg: ClusterConfig) -> None:
    """ConfigError when the Ray this process started or will start (one node, which no node
    joins) has less of a resource than one worker asks for: no worker could ever start, and
    the job would wait `cluster.placement_timeout_s` for one. Before that Ray starts its CPUs
    are known (`cluster.num_cpus`, else the machine's) and its GPUs not yet: they are
    checked once it runs. A joined cluster may grow: not checked."""
    have = _embedded_resources(cfg)
    if have is None:
        return
    for name, amount in worker_request(cfg, have).items():
        if amount > have.get(name, 0):
            setting = {"CPU": "cpus_per_worker", "GPU": "gpus_per_worker"}.get(name)
            key = f"cluster.{setting}" if setting else f"cluster.worker_resources.{name}"
            raise ConfigError(
                f"{key}={amount:g} asks each worker for {amount:g} {name}, more than the "
                f"embedded Ray has ({have.get(name, 0):g}), so no worker could start: ask for "
                f"at most that, or run on a cluster whose nodes have more (cluster=ray; "
                f"README: Run on a cluster)"
            )


def _embedded_resources(cfg: ClusterConfig) -> dict[str, float] | None:
    """The resources of the Ray this process started, or of the one it will start (its
    CPUs only: see `check_placeable`); None for a cluster it joined or will join."""
    if ray.is_initialized():
        node = own_node()
        return ray.cluster_resources() if node is not None and node.is_head() else None
    if cfg.address is not None:
        return None
    if cfg.num_cpus is not None:
        return {"CPU": float(cfg.num_cpus)}
    return {"CPU": float(ray._private.utils.get_num_cpus())}  # what ray.init would count


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

    check_placeable(cfg)
    actor_cls = ray.remote(GradientWorker).options(**worker_options(cfg))
    threads = threads_for(cfg.cpus_per_worker)
    return lambda i: actor_cls.remote(job, None, threads, i, objects, datasets)


def start_worker_pool(
    cfg: ClusterConfig,
    job: dict[str, Any],
    model_hash: str,
    objects: dict[str, ray.ObjectRef] | None = None,
    spares: list[Any] | None = None,
    size: int | None = None,
) -> ActorPool:
    """Start `size` GradientWorker actors (default `cfg.num_workers`, growing to
    `cfg.max_workers`; a `size` below it does not grow), using `spares` (made by
    `worker_factory` for the same job, e.g. while the driver prepared it) first."""
    fixed = size is not None and size < cfg.num_workers  # the driver computes beside them
    return ActorPool(
        worker_factory(cfg, job, objects),
        cfg.num_workers if size is None else size,
        start=lambda actor: actor.start.remote(model_hash),
        spares=spares,
        max_size=size if fixed else cfg.max_workers,
        request=worker_request(cfg),
        scale_check_s=cfg.scale_check_s,
        placement_timeout_s=cfg.placement_timeout_s,
    )
