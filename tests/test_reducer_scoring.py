"""Scoring through the Reducer on Ray: a killed scorer task is retried without losing or
duplicating pairs, results appear only when complete (a failed run leaves the previous
complete results in place), and per-layer breakdowns add up to the scores."""

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch

from grass_dist.errors import ResultsCollectedError, ResultsNotFoundError
from grass_dist.gradients.computer import PhiBlock
from grass_dist.runtime.faults import KillOnce
from grass_dist.runtime.reducer import Reducer, ScoreRequest, preconditioner_path
from grass_dist.scoring import results
from grass_dist.scoring.precondition import Preconditioner
from tests.synthetic import phi_rows, read_all, write_index
from tests.test_precondition import exact_fisher, format1_bytes

pytestmark = pytest.mark.integration

LAYERS = {"a": 8, "b": 8}


@pytest.fixture(scope="module")
def reducer(ray_session, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("faults") / "index")
    index = write_index(url, 3000, LAYERS, shard_rows=500)
    actor = ray.remote(Reducer).options(num_cpus=0).remote(url, {}, 3)
    ray.get(actor.build_preconditioner.remote("fisher"))
    yield index, actor
    ray.kill(actor)


QUERY = PhiBlock(np.arange(7), [f"q{i}" for i in range(7)], phi_rows(10**6, 10**6 + 7, LAYERS))


def _until_cpus_idle(timeout_s: float = 60.0) -> None:
    """Wait until no task holds a CPU of the cluster (the reducer holds none)."""
    deadline = time.monotonic() + timeout_s
    total = ray.cluster_resources().get("CPU", 0)
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.1)


def _score(actor, name, fault=None, **kw):
    args = dict(
        precondition_name="fisher", damping=0.1, kind="influence", topk=20, dense=True,
        self_influence=True, tile_rows=200, parallelism=3,
    )  # fmt: skip
    return ray.get(actor.score.remote(QUERY, ScoreRequest(name, **{**args, **kw}), fault))


def test_a_scorer_killed_mid_run_is_retried_without_lost_or_duplicate_pairs(reducer, tmp_path):
    index, actor = reducer
    clean = _score(actor, "clean")
    faulty = _score(actor, "faulty", fault=KillOnce(str(tmp_path), "after_dense_part"))
    assert (tmp_path / "killed-after_dense_part").exists()  # a scorer process really died
    parts = faulty["files"]["dense"]
    assert len(parts) == len(set(parts)) == 18  # 6 shards x 3 tiles, each once
    dense = results.load_dense(index, "faulty")
    assert dense.shape == (3000, 7)
    np.testing.assert_array_equal(dense, results.load_dense(index, "clean"))
    for kind in ("topk", "self_influence"):
        got = results.load_table(index, "faulty", kind)
        assert got.equals(results.load_table(index, "clean", kind))
    assert clean["files"]["dense"] != faulty["files"]["dense"]  # separate run folders


def test_a_failed_run_leaves_the_last_complete_results_visible(reducer, tmp_path):
    index, actor = reducer
    with pytest.raises(ResultsNotFoundError):
        results.manifest(index, "kept")
    first = _score(actor, "kept", dense=False)
    before = results.load_table(index, "kept", "topk")
    with pytest.raises(ray.exceptions.RayError):
        _score(actor, "kept", topk=3, max_retries=0, fault=KillOnce(str(tmp_path), "after_shard"))
    assert results.manifest(index, "kept")["files"] == first["files"]
    assert results.load_table(index, "kept", "topk").equals(before)
    # The failed run removed what it had written, but a scorer task still running then may
    # have written a part since (best effort: jobs.gc removes it, below; test_api_damage.py
    # checks the removal where the scorer calls run in the driver, one after another). Such
    # tasks are not waited for: let them end (their CPUs free again) before looking.
    _until_cpus_idle()
    first_folder = results.run_folder(first["files"]["topk"])
    walked = {results.run_folder(p) for p in index.store.walk("results/kept")}
    left = walked - {None, first_folder}
    assert len(left) <= 1
    # A run whose reducer was killed before it completed leaves such a folder too: as this one.
    (failed,) = left or {results.new_run_dir("kept")}
    index.put_artifact(f"{failed}/self_influence/000000000000-000000000100.parquet", b"part")
    for derived in results.DERIVED:  # what later stages wrote from the first run
        index.put_artifact(f"results/kept/{derived}", b"of the first run")
    second = _score(actor, "kept", topk=3, dense=False)
    assert results.load_table(index, "kept", "topk").num_rows == 2 * 7 * 3
    for path in _paths(first["files"]):  # the replaced run's files are gone
        assert not index.has_artifact(path)
    assert not (Path(index.url) / first_folder).exists()  # and so is its folder
    for derived in results.DERIVED:  # stale: they describe the replaced run
        assert not index.has_artifact(f"results/kept/{derived}")
    assert all(index.has_artifact(p) for p in _paths(second["files"]))

    young = results.collect_abandoned(index.store, grace_s=3600)
    assert (young["abandoned_runs"], young["young"], young["removed"]) == (1, 1, 0)
    dry = results.collect_abandoned(index.store, grace_s=0, dry_run=True)
    assert dry["removed"] == 1 and dry["files_removed"] >= 1 and dry["bytes_reclaimed"] > 0
    assert (Path(index.url) / failed).is_dir()
    done = results.collect_abandoned(index.store, grace_s=0)
    assert {k: done[k] for k in ("removed", "bytes_reclaimed")} == {
        k: dry[k] for k in ("removed", "bytes_reclaimed")
    }
    assert not (Path(index.url) / failed).exists()
    assert results.load_table(index, "kept", "topk").num_rows == 2 * 7 * 3  # current: kept
    assert results.collect_abandoned(index.store, grace_s=0)["abandoned_runs"] == 0


def test_a_run_whose_files_were_collected_meanwhile_is_not_published(tmp_path):
    index = write_index(str(tmp_path / "index"), 100, LAYERS, shard_rows=50)
    table = pa.table({"x": [1, 2]})
    first = {"topk": results.write_table(index, results.new_run_dir("r"), "topk.parquet", table)}
    results.complete(index, "r", first, {"run": 1})
    run_dir = results.new_run_dir("r")
    files = {"topk": results.write_table(index, run_dir, "topk.parquet", table)}
    files["dense"] = [results.write_table(index, run_dir, "dense/s.0.parquet", table)]
    index.store.delete(files["dense"][0])  # as a gc with too short a grace would
    with pytest.raises(ResultsCollectedError, match="gc.grace_s"):
        results.complete(index, "r", files, {"run": 2})
    assert results.manifest(index, "r") == {"files": first, "summary": {"run": 1}}
    assert index.has_artifact(first["topk"])


def _paths(files: dict) -> list[str]:
    return [p for v in files.values() for p in (v if isinstance(v, list) else [v])]


def test_per_row_outputs_stream_to_parts_and_read_back_as_one_table(reducer):
    index, actor = reducer
    out = _score(actor, "parts", dense=False)
    assert len(out["files"]["self_influence"]) == 6  # one part per shard
    diag = results.load_table(index, "parts", "self_influence")
    assert diag.column_names == ["train_row", "train_key", "self_influence", "grad_norm_sq"]
    assert diag["train_row"].to_pylist() == list(range(3000))
    assert diag["train_key"].to_pylist() == [f"row-{r}" for r in range(3000)]
    assert (diag["grad_norm_sq"].to_numpy() > 0).all()
    top = results.load_table(index, "parts", "topk")
    assert top["train_key"].to_pylist() == [f"row-{r}" for r in top["train_row"].to_pylist()]


@pytest.mark.parametrize("kind", ["cosine", "influence"])
def test_layer_breakdown_columns_sum_to_the_score_through_the_reducer(reducer, kind):
    index, actor = reducer
    out = _score(
        actor, f"bd-{kind}", kind=kind, dense=False, breakdown=True, topk=5, self_influence=False
    )
    table = results.load_table(index, f"bd-{kind}", "topk").to_pandas()
    assert out["files"]["topk"].endswith("topk.parquet") and len(table) == 2 * 7 * 5
    total = table["score.a"] + table["score.b"]
    np.testing.assert_allclose(total, table["score"], rtol=1e-4, atol=1e-5)
    assert (table["score.a"] != 0).all() and (table["score.b"] != 0).all()
    if kind == "cosine":
        assert table["score"].abs().max() <= 1.0 + 1e-6
    # The summary names a damping only where a preconditioner was applied (no self-influence).
    summary = results.manifest(index, f"bd-{kind}")["summary"]
    assert (summary["damping"] is None) == (kind == "cosine")
    best = table[(table["kind"] == "proponent") & (table["rank"] == 0)]
    worst = table[(table["kind"] == "opponent") & (table["rank"] == 0)]
    assert (best["score"].to_numpy() > worst["score"].to_numpy()).all()


def test_stored_cholesky_and_format_1_preconditioners_score_as_the_dense_inverse(reducer):
    """Factors built at damping 0.1 (layers in parallel tasks) and stored next to H, and a
    format-1 file (eigenbasis only, as written before): both give the float64 scores and
    self-influence of explicit (H + lambda I)^-1."""
    index, actor = reducer
    ray.get(actor.build_preconditioner.remote("chol", True, 0.1))
    stored = Preconditioner.from_bytes(index.get_artifact(preconditioner_path("chol")))
    assert stored.delta == 0.1 and all(0.1 in f.cholesky for f in stored.layers.values())
    _, train = read_all(index)
    index.put_artifact(preconditioner_path("old"), format1_bytes(exact_fisher(train)))
    want_dense, want_self = 0.0, 0.0
    for name, x in train.items():
        t = torch.tensor(x, dtype=torch.float64)
        h = t.T @ t / len(t)
        inv = torch.linalg.inv(h + 0.1 * torch.trace(h) / h.shape[0] * torch.eye(h.shape[0]))
        want_dense = want_dense + t @ inv @ torch.tensor(QUERY.phi[name], dtype=torch.float64).T
        want_self = want_self + ((t @ inv) * t).sum(1)
    for name in ("chol", "old"):
        _score(actor, f"via-{name}", precondition_name=name)
        dense = torch.tensor(results.load_dense(index, f"via-{name}"), dtype=torch.float64)
        assert (dense - want_dense).abs().max() / want_dense.abs().max() < 1e-5
        diag = results.load_table(index, f"via-{name}", "self_influence")
        np.testing.assert_allclose(diag["self_influence"].to_numpy(), want_self, rtol=1e-5)
