"""One assembly: the store opener's retry policy everywhere, in-memory objects by content."""

from __future__ import annotations

import pickle

import pytest
import torch

from grass_dist import assembly, pipeline
from grass_dist.build import build_dataset
from grass_dist.data import digits
from grass_dist.errors import ConfigError
from grass_dist.index.retry import RetryPolicy
from grass_dist.runtime.worker import GradientWorker
from grass_dist.service.engine import open_checked
from tests.conftest import compose_cfg


def test_content_names_in_memory_objects():
    a, b = digits("train", n_train=20, n_query=5), digits("train", n_train=20, n_query=5)
    node = assembly.register(a)
    assert node == assembly.register(b)  # same rows, same name
    assert node["sha256"] != assembly.register(digits("train", n_train=21, n_query=5))["sha256"]
    assert assembly.in_memory(node["sha256"], node["type"]) is b
    model = torch.nn.Linear(3, 2)
    kept = assembly.register(model)
    before = kept["sha256"]
    assert assembly.in_memory(before, kept["type"]) is not model  # a copy: the caller's stays
    with torch.no_grad():
        model.weight[0, 0] += 1
    assert assembly.register(model)["sha256"] != before
    with pytest.raises(ConfigError, match="name a factory instead"):
        assembly.in_memory("0" * 64, "torch.nn.Linear")


def test_rows_that_view_one_tensor_are_shipped_without_it():
    # A list of row views, the obvious way to make a list of pairs, pickled as it is
    # carries the whole tensor once per row: 1000 rows of 64 floats made 265 MB.
    x, y = torch.rand(1000, 64), torch.randint(0, 10, (1000,))
    rows = [(x[i], y[i]) for i in range(1000)]
    keyed = [{"input": x[i, ::2], "label": y[i]} for i in range(1000)]  # strided views too
    for data in (rows, keyed, tuple(rows)):
        shipped = assembly.shippable(data)
        assert type(shipped) is type(data)
        assert assembly.content_digest(shipped) == assembly.content_digest(data)
        # Each row's own bytes and pickle's framing of its tensors: about 0.8 MB, not 265.
        assert len(pickle.dumps(shipped)) < 2_000_000
    assert len(pickle.dumps(rows)) > 100_000_000
    whole = torch.rand(5, 3)
    assert assembly.shippable(whole) is whole  # a tensor of its own storage is not copied


def test_driver_worker_and_service_open_the_store_with_the_jobs_retry_policy(tmp_path):
    cfg = compose_cfg(tmp_path, "store.retries=7", "store.backoff_s=0.25", "store.backoff_max_s=2")
    job = pipeline.prepare(cfg)  # writes index.json only; no Ray
    policy = RetryPolicy(7, 0.25, 2.0)
    assert job.index.store.retry == policy
    threads = torch.get_num_threads()
    worker = GradientWorker(job.raw, job.model_hash, threads=threads + 1)
    assert torch.get_num_threads() == threads  # outside an actor: the caller's count stays
    assert worker.index.store.retry == policy
    index, replica = open_checked(job.cfg, build_dataset(job.cfg, "train"))
    assert index.store.retry == policy
    assert [(n, c.spec()) for n, c in replica.compressors.items()] == [
        (n, c.spec()) for n, c in worker.computer.compressors.items()
    ]
