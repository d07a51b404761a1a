"""CPU lanes: a computer of several lanes computes that many batches at once, each lane on
its share of torch's threads with a copy of the model's modules (the weights shared)."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from grass_dist.compress import build_compressors
from grass_dist.config import ClusterConfig, CompressionConfig, JobConfig
from grass_dist.errors import BadTokensError, ConfigError
from grass_dist.gradients.capture import resolve_layers
from grass_dist.gradients.computer import GradientComputer
from grass_dist.runtime.cluster import lanes_for
from grass_dist.tasks.language_model import CausalLMTask
from tests.conftest import compose_cfg
from tests.helpers import torch_threads
from tests.test_lm import make_items, tiny_lm


def _computer(model, lanes: int, method: str = "factgrass") -> GradientComputer:
    comps = build_compressors(
        CompressionConfig(method=method, k=8, seed=3), resolve_layers(model, None)
    )
    return GradientComputer(model, CausalLMTask("sum", 4096), comps, "cpu", lanes)


@contextmanager
def batches_seen():
    """(thread ident, torch threads there) of each phi_batch call meanwhile; the batches wait
    (10 s at most) until a second thread computes one."""
    seen: list[tuple[int, int]] = []
    real = GradientComputer.phi_batch
    two = threading.Event()

    def phi_batch(self, batch):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        if len({ident for ident, _ in seen}) > 1:
            two.set()
        two.wait(10)  # the first lane waits for a second (a loaded machine may start it late)
        return real(self, batch)

    GradientComputer.phi_batch = phi_batch
    try:
        yield seen
    finally:
        GradientComputer.phi_batch = real


ITEMS = make_items([6, 6, 9, 9, 4, 4, 7, 7, 5, 5, 8])  # 11 rows: 6 batches of <= 2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["identity", "factgrass"])
def test_two_lanes_give_one_lane_on_one_threads_bits(arch, method):
    rows = range(len(ITEMS))
    with torch_threads(1):
        want = _computer(tiny_lm(arch), 1, method).phi_rows(ITEMS, rows, batch_size=2)
    with torch_threads(2), batches_seen() as seen:
        laned = _computer(tiny_lm(arch), 2, method)
        got = laned.phi_rows(ITEMS, rows, batch_size=2)
        after = torch.get_num_threads()
    assert laned.lanes == 2 and after == 2  # the caller's thread count is back
    assert len(seen) == 6 and len({ident for ident, _ in seen}) == 2  # two threads computed
    assert {threads for _, threads in seen} == {1}  # each lane on one torch thread
    assert list(got.row_ids) == list(want.row_ids)
    for name, phi in want.phi.items():
        assert np.array_equal(got.phi[name], phi), name


def test_the_lanes_share_the_models_weights_and_only_its_copies_are_new():
    model = tiny_lm("gpt2")
    laned = _computer(model, 3)
    assert laned.lanes == 3
    lanes = [laned.model, *laned._lane_models]
    assert len({id(m) for m in lanes}) == 3
    for copy in laned._lane_models:
        for (name, p), q in zip(model.named_parameters(), copy.parameters(), strict=True):
            assert p is q, name
        # the capture's hooks are on the computer's own model only
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in copy.modules())


def test_the_first_failing_batch_is_the_error_as_with_one_lane():
    class Rows(list):
        keys = [f"k{i}" for i in range(8)]

    # rows 3 and 6 hold a token outside the vocabulary of 40: batches 1 and 3 of 2 rows fail
    ids = [[1, 2, 3]] * 8
    ids[3], ids[6] = [4, 99, 5], [6, 99, 7]
    rows = Rows(torch.tensor(i) for i in ids)
    messages = []
    for lanes in (1, 2):
        with torch_threads(2), pytest.raises(BadTokensError) as e:
            _computer(tiny_lm("gpt2"), lanes).phi_rows(rows, range(8), batch_size=2)
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith("rows [3] (keys ['k3']): token id 99")


def test_the_earliest_failing_batch_is_raised_even_when_a_later_one_fails_first():
    laned = _computer(tiny_lm("gpt2"), 2)
    ran: list[int] = []

    def one(computer, group, batch):
        ran.append(batch)
        if batch == 1:
            time.sleep(0.3)  # fails last: the other lane has taken batch 2 and failed by then
            raise ValueError("batch 1")
        if batch >= 2:
            raise ValueError(f"batch {batch}")

    with pytest.raises(ValueError, match="^batch 1$"):
        laned._by_lanes([([i], i) for i in range(6)], one)
    assert sorted(ran) == [0, 1, 2]  # no lane took a batch after batch 2 failed


def test_on_batch_counts_every_row_once_across_lanes():
    laned = _computer(tiny_lm("gpt2"), 2)
    loaded = laned.load_rows(ITEMS, range(len(ITEMS)), 2, "rows")
    counted: list[int] = []
    with torch_threads(2):
        laned.phi_loaded(loaded, on_batch=counted.append)
    assert sorted(counted) == sorted(len(group) for group, _ in loaded.batches)
    assert sum(counted) == len(ITEMS)


def test_a_model_that_cannot_be_copied_computes_in_one_lane():
    model = tiny_lm("gpt2")
    model.lock = threading.Lock()  # deepcopy refuses a lock
    laned = _computer(model, 2)
    assert laned.lanes == 1 and laned._lane_models == []
    block = laned.phi_rows(ITEMS, range(4), batch_size=2)
    assert all(np.isfinite(phi).all() for phi in block.phi.values())


def test_lanes_for_a_worker():
    assert lanes_for(ClusterConfig(), 1) == 1
    assert lanes_for(ClusterConfig(), 2) == 2
    assert lanes_for(ClusterConfig(), 4) == 4
    assert lanes_for(ClusterConfig(), 8) == 1  # wider workers: one batch on every thread
    assert lanes_for(ClusterConfig(cpu_lanes=2), 8) == 2
    assert lanes_for(ClusterConfig(cpu_lanes=3), 2) == 2  # at most one per thread
    assert lanes_for(ClusterConfig(cpu_lanes=1), 4) == 1


@pytest.mark.parametrize("value", ["0", "-1"])
def test_cpu_lanes_below_one_is_refused(tmp_path, value):
    cfg = OmegaConf.to_container(compose_cfg(tmp_path, f"cluster.cpu_lanes={value}"), resolve=True)
    with pytest.raises(ConfigError, match=f"cluster.cpu_lanes={value} must be at least 1"):
        JobConfig.from_cfg(cfg)


@pytest.mark.parametrize("cpus", [1, 2])
def test_the_driver_computes_its_shards_in_a_workers_lanes(tmp_path, cpus):
    from grass_dist.assembly import Replica
    from grass_dist.runtime import compute_thread
    from grass_dist.runtime.local_shard import as_a_worker

    given = compose_cfg(tmp_path, f"cluster.cpus_per_worker={cpus}")
    cfg = JobConfig.from_cfg(OmegaConf.to_container(given, resolve=True))
    model = tiny_lm("gpt2")
    comps = _computer(model, 1).compressors
    before = compute_thread.call(torch.get_num_threads)
    with as_a_worker(cfg, Replica(model, CausalLMTask("sum", 4096), comps)) as computer:
        threads = min(cpus, os.cpu_count() or 1)  # a worker's: one lane per thread
        assert compute_thread.call(torch.get_num_threads) == threads == computer.lanes
    assert compute_thread.call(torch.get_num_threads) == before
