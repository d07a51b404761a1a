"""damping=auto eigendecomposes H once: sweeps read phi, never recompute or refactorise."""

import dataclasses

import numpy as np
import pytest
import torch

from grass_dist.build import IN_MEMORY
from grass_dist.config import JobConfig
from grass_dist.errors import DampingSelectionError
from grass_dist.fidelity import damping
from grass_dist.gradients.computer import GradientComputer
from grass_dist.index import GradientIndex
from grass_dist.runtime.executors import Executor
from grass_dist.scoring.fisher_sum import FisherSum
from grass_dist.scoring.precondition import Preconditioner
from tests.conftest import compose_cfg

LAYERS = {"fc1": 6, "out": 4}


def _index(tmp_path, n=30, shard=10):
    rng = np.random.default_rng(0)
    phi = {name: rng.standard_normal((n, k)).astype(np.float32) for name, k in LAYERS.items()}
    fp = {"layers": [{"name": n, "k": k} for n, k in LAYERS.items()], "dtype": "float32"}
    index = GradientIndex.create_or_open(str(tmp_path / "idx"), fp)
    records = []
    for lo in range(0, n, shard):
        part = {name: x[lo : lo + shard] for name, x in phi.items()}
        rows = np.arange(lo, lo + shard)
        records.append(
            index.write_shard(f"{lo:04d}", lo, lo + shard, rows, [str(r) for r in rows], part)
        )
    index.commit(records)
    return index, phi


def _direct(phi, query, delta):
    total = 0
    for name, x in phi.items():
        h = x.astype(np.float64).T @ x / len(x)
        lam = delta * np.trace(h) / h.shape[0]
        total = total + x @ np.linalg.solve(h + lam * np.eye(h.shape[0]), query[name].T)
    return total  # (n, Q)


def test_sweep_scores_every_delta_from_one_eigendecomposition(tmp_path, monkeypatch):
    index, phi = _index(tmp_path)
    saved = Preconditioner.from_fisher(FisherSum.of(phi)).factorise(0.1).to_bytes()
    pre = Preconditioner.from_bytes(saved).eigendecompose()
    rng = np.random.default_rng(1)
    query = {name: rng.standard_normal((5, k)).astype(np.float32) for name, k in LAYERS.items()}
    masks = rng.random((7, 30)) < 0.5

    def forbidden(*args, **kwargs):
        raise AssertionError("the sweep recomputed gradients or refactorised H")

    monkeypatch.setattr(GradientComputer, "phi_batch", forbidden)
    monkeypatch.setattr(GradientComputer, "phi_rows", forbidden)
    monkeypatch.setattr(Preconditioner, "from_fisher", forbidden)
    monkeypatch.setattr(torch.linalg, "eigh", forbidden)
    monkeypatch.setattr(torch.linalg, "cholesky", forbidden)

    grid = [1e-3, 1e-1, 10.0]
    cols = damping.stacked_queries(pre, query, grid, "influence")
    records = sorted(index.committed().values(), key=lambda r: r.start)
    # Two groups merged, as the Ray fan-out does.
    part = damping.sweep_records(index, records[:1], cols, masks, 1).merge(
        damping.sweep_records(index, records[1:], cols, masks, 1)
    )
    top = damping.sweep_records(index, records, cols, None, 3).top
    for d, delta in enumerate(grid):
        want = _direct(phi, query, delta)
        got = part.sums[:, d * 5 : (d + 1) * 5]
        np.testing.assert_allclose(got, masks @ want, rtol=1e-4, atol=1e-4)
        want_top = np.argsort(-want, axis=0, kind="stable")[:3].T
        np.testing.assert_array_equal(top.rows[d * 5 : (d + 1) * 5].numpy(), want_top)


def test_the_sweep_gives_the_same_bits_as_ray_tasks_and_in_this_process(tmp_path, ray_session):
    """A small index's driver runs the sweep itself (Executor(inline=True)): the same calls,
    grouping and merge as the Ray tasks of a larger one, so the same sums and rankings."""
    index, phi = _index(tmp_path, n=40)
    pre = Preconditioner.from_fisher(FisherSum.of(phi)).factorise(0.1).eigendecompose()
    rng = np.random.default_rng(2)
    query = {name: rng.standard_normal((3, k)).astype(np.float32) for name, k in LAYERS.items()}
    cols = damping.stacked_queries(pre, query, [1e-2, 1.0], "influence")
    masks = rng.random((5, 40)) < 0.5
    for kept, topk in ((masks, 1), (None, 4)):
        tasks = damping.sweep(index, cols, kept, topk, 3, Executor())
        here = damping.sweep(index, cols, kept, topk, 3, Executor(inline=True))
        if kept is not None:
            assert tasks.sums.shape == (5, 6)
            np.testing.assert_array_equal(here.sums, tasks.sums)
        else:
            assert tasks.top.rows.shape == (6, 4)
            assert torch.equal(here.top.rows, tasks.top.rows)
            assert torch.equal(here.top.values, tasks.top.values)


def test_validation_split_and_choice():
    val, test = damping.validation_split(50, 0.1, seed=0)
    assert len(val) == 5 and len(test) == 45 and not set(val) & set(test)
    assert np.array_equal(val, damping.validation_split(50, 0.1, seed=0)[0])
    assert not np.array_equal(val, damping.validation_split(50, 0.1, seed=1)[0])
    assert len(damping.validation_split(3, 0.1, 0)[0]) == 1  # at least one each
    with pytest.raises(DampingSelectionError, match="at least 2 queries"):
        damping.validation_split(1, 0.1, 0)
    assert damping.best_delta([0.1, float("nan"), 0.3, 0.3], [1e-3, 1e-2, 1e-1, 1.0]) == 1.0
    with pytest.raises(DampingSelectionError, match="undefined"):
        damping.best_delta([float("nan")], [1.0])


def test_the_label_proxy_refuses_what_it_cannot_judge(tmp_path):
    named = JobConfig.from_cfg(compose_cfg(tmp_path))  # model and data by import path
    classes = {"data.train": np.array([0, 3, 1]), "data.query": np.array([2.0, 1.0])}
    damping.check_class_labels(classes, named)  # integers, and floats that are whole numbers
    fractions = {**classes, "data.query": np.array([1.0, 0.25])}
    with pytest.raises(DampingSelectionError, match=r"data.query's labels are not whole.*0\.25"
                       r".*: build ground truth with python -m jobs\.lds, or set "):  # fmt: skip
        damping.check_class_labels(fractions, named)
    # jobs.lds cannot name objects given to the Python API: only the number is offered.
    in_memory = dataclasses.replace(named, model={"_target_": IN_MEMORY})
    with pytest.raises(DampingSelectionError, match=r"targets\?\): set precondition\.damping"):
        damping.check_class_labels(fractions, in_memory)
    damping.check_proxy_signal([0.0, 0.1, 0.0], 4, 10)
    damping.check_proxy_signal([0.5, 0.5], 4, 10)  # a tie: best_delta takes the larger delta
    with pytest.raises(DampingSelectionError, match="no delta.*4 validation queries. top 10"):
        damping.check_proxy_signal([0.0, 0.0, 0.0], 4, 10)
