"""Connecting to Ray: embedded by default, an existing cluster when an address is given."""

from __future__ import annotations

import logging
import os

import ray

from grass_dist.config import ClusterConfig

log = logging.getLogger(__name__)


def connect(cfg: ClusterConfig) -> None:
    """Start an embedded Ray (address null) or join `cfg.address` ('auto', ray://...)."""
    if ray.is_initialized():
        return
    if cfg.address is None:
        ray.init(
            address="local",  # a new Ray here, even if `ray start` left one running
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
        log.info("started an embedded Ray with %s CPUs", ray.cluster_resources().get("CPU"))
    else:
        ray.init(address=cfg.address, logging_level=logging.WARNING)
        log.info("joined the Ray cluster at %s", cfg.address)


def worker_options(cfg: ClusterConfig) -> dict:
    """Ray actor options for one GradientWorker: a GPU each when the cluster has GPUs."""
    opts: dict = {"num_cpus": cfg.cpus_per_worker}
    if ray.cluster_resources().get("GPU", 0) > 0 and cfg.gpus_per_worker > 0:
        opts["num_gpus"] = cfg.gpus_per_worker
    return opts


def threads_for(cpus: float) -> int:
    """Torch threads for an actor given `cpus` logical CPUs (never more than the machine)."""
    return max(1, min(int(cpus), os.cpu_count() or 1))
