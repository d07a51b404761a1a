"""Ensembles: member configs, and the averaged result set equals the members' mean."""

import numpy as np
import pyarrow as pa
import pytest
from omegaconf import OmegaConf

from grass_dist.config import JobConfig
from grass_dist.errors import ConfigError
from grass_dist.index import Store
from grass_dist.scoring import ensemble, results
from tests.conftest import compose_cfg


class _Train:
    keys = [f"t{i}" for i in range(10)]


def _member(url, scores: np.ndarray, self_inf: np.ndarray):
    where = results.ArtifactDir(Store(url))
    run_dir = results.new_run_dir("run")
    dense = [
        results.write_dense_part(
            where, run_dir, f"{lo:04d}", lo, np.arange(lo, lo + 5), scores[lo : lo + 5].T
        )
        for lo in (0, 5)
    ]
    topk = pa.table(
        {
            "query_row": [0, 1, 2],
            "query_key": ["q0", "q1", "q2"],
            "rank": [0, 0, 0],
            "kind": ["proponent"] * 3,
            "train_row": [0, 0, 0],
            "score": [0.0] * 3,
            "train_key": ["t0"] * 3,
        }
    )
    self_table = pa.table(
        {"train_row": np.arange(10), "train_key": _Train.keys, "self_influence": self_inf}
    )
    files = {
        "topk": results.write_table(where, run_dir, "topk.parquet", topk),
        "self_influence": results.write_table(where, run_dir, "self_influence.parquet", self_table),
        "dense": dense,
    }
    results.complete(where, "run", files, {})
    return where


def test_average_is_the_mean_of_the_members_dense_scores(tmp_path):
    rng = np.random.default_rng(0)
    scores = [rng.standard_normal((10, 3)).astype(np.float32) for _ in range(3)]
    selfs = [rng.random(10) for _ in range(3)]
    members = [_member(str(tmp_path / f"m{c}"), scores[c], selfs[c]) for c in range(3)]
    root = results.ArtifactDir(Store(str(tmp_path / "root")))
    summary = ensemble.average(members, "run", root, topk=2, train=_Train())
    assert summary["ensemble_members"] == 3
    mean = np.mean(scores, axis=0)
    np.testing.assert_allclose(results.load_dense(root, "run"), mean, rtol=1e-6)
    topk = results.load_table(root, "run", "topk").to_pandas()
    for q in range(3):
        props = topk[(topk.query_row == q) & (topk.kind == "proponent")].sort_values("rank")
        assert props.train_row.tolist() == np.argsort(-mean[:, q])[:2].tolist()
        np.testing.assert_allclose(props.score, np.sort(mean[:, q])[::-1][:2], rtol=1e-6)
        assert props.train_key.tolist() == [f"t{r}" for r in props.train_row]
        opps = topk[(topk.query_row == q) & (topk.kind == "opponent")].sort_values("rank")
        assert opps.train_row.tolist() == np.argsort(mean[:, q])[:2].tolist()
    self_inf = results.load_table(root, "run", "self_influence").to_pandas()
    np.testing.assert_allclose(self_inf.self_influence, np.mean(selfs, axis=0))


def test_member_configs(tmp_path):
    cfg = compose_cfg(tmp_path, "ensemble.size=3", "model.seed=4", "index.url=/tmp/runs/x")
    raw = OmegaConf.to_container(cfg, resolve=True)
    members = ensemble.member_configs(raw, JobConfig.from_cfg(raw))
    assert [m["model"]["seed"] for m in members] == [4, 5, 6]
    assert [m["index"]["url"] for m in members] == [f"/tmp/runs/x/ckpt_{c}" for c in range(3)]
    assert all(m["scoring"]["dense"] and m["ensemble"]["size"] == 1 for m in members)
    raw["ensemble"] = {"size": 1, "models": [{"epochs": 2}, {"epochs": 4}]}
    members = ensemble.member_configs(raw, JobConfig.from_cfg(raw))
    assert [m["model"]["epochs"] for m in members] == [2, 4]
    raw["ensemble"] = {"size": 2, "models": []}
    raw["model"] = {"_target_": "my.model"}
    with pytest.raises(ConfigError, match="ensemble.models"):
        ensemble.member_configs(raw, JobConfig.from_cfg(raw))
