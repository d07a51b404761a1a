"""The Python API: README's example as written, and the same index and scores as the jobs."""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import grass_dist as gd
from grass_dist import assembly, pipeline, run
from grass_dist.api import job_config
from grass_dist.build import build_dataset, build_model
from grass_dist.config import JobConfig, resolve
from grass_dist.data import digits
from grass_dist.errors import (
    ConfigError,
    DataMismatchError,
    FingerprintMismatchError,
    ResultsNotFoundError,
    StorageOverflowError,
)
from grass_dist.index import GradientIndex
from grass_dist.models.digits import digits_mlp
from grass_dist.models.state import state_hash
from grass_dist.scoring import results
from grass_dist.tasks.classifier import ClassificationTask
from tests.conftest import ROOT, compose_cfg
from tests.helpers import Outputs

# The jobs' command line of the equivalence test, and the same settings for the API.
SIZES = ["data.train.n_train=120", "compression.k=16", "cluster.num_workers=1", "scoring.topk=5"]
SETTINGS = ["index.shard_size=32", "index.batch_size=16", "cluster.cpus_per_worker=0.5"]


def _rows(index: GradientIndex) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    parts = [data for _, data in index.iter_committed()]
    order = np.argsort(np.concatenate([d.row_ids for d in parts]))
    phi = {n: np.concatenate([d.phi[n] for d in parts])[order] for n in parts[0].phi}
    return np.concatenate([d.row_ids for d in parts])[order], phi


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text().partition("## Python API")[2]
    return re.search(r"^```python\n(.*?)^```", text, flags=re.M | re.S).group(1)


def test_factories_and_config_nodes_become_the_jobs_nodes():
    raw = job_config(
        functools.partial(digits_mlp, hidden=[16]),
        {"_target_": "grass_dist.data.digits", "split": "train"},
        task=digits,  # any factory: named by import path
        k=16,
    )
    assert raw["model"] == {"_target_": "grass_dist.models.digits_mlp", "hidden": [16]}
    assert raw["data"]["train"] == {"_target_": "grass_dist.data.digits", "split": "train"}
    assert raw["task"] == {"_target_": "grass_dist.data.digits"}  # re-exported: importable
    assert raw["compression"] == {"method": "factgrass", "k": 16}
    with pytest.raises(ConfigError, match="positional"):
        job_config(functools.partial(digits_mlp, [16]), {"_target_": "x"})
    with pytest.raises(ConfigError, match="store=123 is not a path or URL"):
        job_config(digits_mlp, {"_target_": "x"}, store=123)
    assert job_config(digits_mlp, {"_target_": "x"}, store=Path("i"))["store"]["url"] == "i"


@pytest.mark.parametrize(
    "preset", sorted(p.stem for p in (ROOT / "conf" / "compression").glob("*.yaml"))
)
def test_a_compression_argument_is_the_jobs_preset_of_that_name(tmp_path, preset):
    # compression="identity" keeps non-Linear layers exact too (its preset's other=identity).
    jobs = JobConfig.from_cfg(resolve(compose_cfg(tmp_path, f"compression={preset}", small=False)))
    api = JobConfig.from_cfg(job_config(digits_mlp, digits, compression=preset))
    assert api.compression == jobs.compression
    with_k = JobConfig.from_cfg(job_config(digits_mlp, digits, compression=preset, k=48))
    assert with_k.compression.k == 48


def test_a_factory_no_worker_can_import_is_refused_naming_what_to_pass():
    def local_model():
        return digits_mlp(hidden=[16])

    script = {"__name__": "__main__"}  # what a user's script or notebook defines
    exec("def make_model(hidden=8):\n    return hidden", script)
    cases = [
        (functools.partial(script["make_model"], hidden=4), r"__main__\.make_model is defined "),
        (local_model, "a lambda or a function defined inside another"),
        (lambda: None, "a lambda"),
    ]
    for factory, said in cases:
        with pytest.raises(ConfigError, match=said) as info:
            job_config(factory, {"_target_": "grass_dist.data.digits"})
        assert "pass the object it builds instead" in str(info.value)


class _Weighted:
    """A user's task without spec(): the classification loss times `weight`."""

    def __init__(self, weight: float):
        self.weight, self.base = weight, ClassificationTask()

    def collate(self, items):
        return self.base.collate(items)

    def to(self, batch, device):
        return self.base.to(batch, device)

    def per_sample_loss(self, model, batch):
        return self.weight * self.base.per_sample_loss(model, batch)


def test_a_task_without_spec_enters_the_fingerprint_by_content(tmp_path):
    # Another loss is another index: reusing the store with it must be refused.
    model = digits_mlp(hidden=[8], epochs=0, n_train=40, n_query=5, cache_dir=str(tmp_path))
    train = digits("train", n_train=40, n_query=5)

    def prepare(task, store=tmp_path / "index"):
        raw = job_config(model, train, task=task, k=8, store=str(store), overrides=here)
        return pipeline.prepare(raw)

    here = [f"run.output_dir={tmp_path}"]

    first = prepare(_Weighted(1.0))
    assert prepare(_Weighted(1.0)).fingerprint == first.fingerprint
    with pytest.raises(FingerprintMismatchError, match=r"task\.sha256: stored="):
        prepare(_Weighted(2.0))
    node = {"_target_": f"{__name__}._Weighted", "weight": 1.0}  # a config node: its arguments
    assert prepare(node, tmp_path / "node").fingerprint["task"] == {
        "target": f"{__name__}._Weighted",
        "weight": 1.0,
    }


class _Tempered(torch.nn.Module):
    """A user's model whose forward depends on plain attributes beside its weights."""

    def __init__(self, temperature: float = 1.0, activation: str = "tanh"):
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.out = torch.nn.Linear(64, 8), torch.nn.Linear(8, 10)
        self.temperature, self.activation = temperature, activation

    def forward(self, x):
        act = torch.tanh if self.activation == "tanh" else torch.relu
        return self.out(act(self.hidden(x))) / self.temperature


def test_a_models_plain_settings_enter_the_fingerprint_with_its_weights(tmp_path):
    # The same weights with another temperature or activation compute other gradients: not
    # the index built before (it was reused, silently), nor the object registered for it.
    train = digits("train", n_train=40, n_query=5)
    here = [f"run.output_dir={tmp_path}"]

    def prepare(model, store=tmp_path / "index"):
        return pipeline.prepare(job_config(model, train, k=8, store=str(store), overrides=here))

    first = prepare(_Tempered())
    assert state_hash(_Tempered(5.0, "relu")) == state_hash(_Tempered())
    assert prepare(_Tempered()).fingerprint == first.fingerprint  # the same model reopens
    for other in (_Tempered(5.0), _Tempered(activation="relu")):
        said = r"model\.settings_sha256: stored=.*\nFix: the model's weights are those the index"
        with pytest.raises(FingerprintMismatchError, match=said):
            prepare(other)
    hot = prepare(_Tempered(5.0), tmp_path / "hot")
    node, hot_node = first.raw["model"], hot.raw["model"]
    assert node["sha256"] != hot_node["sha256"]
    assert assembly.in_memory(node["sha256"], "model").temperature == 1.0
    assert assembly.in_memory(hot_node["sha256"], "model").temperature == 5.0


@pytest.mark.integration
def test_api_index_and_scores_equal_the_jobs(ray_session, tmp_path):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    cfg = compose_cfg(tmp_path / "jobs", *SIZES, *SETTINGS)
    summary = run.attribute(cfg)
    assert (root.handlers, root.level) == (handlers, level)  # the library configures no logging
    jobs = JobConfig.from_cfg(resolve(cfg))
    by_jobs = GradientIndex.open(summary["index_url"])

    # The same model and data as objects in memory, as a notebook holds them.
    model = build_model(jobs)
    train, query = build_dataset(jobs, "train"), build_dataset(jobs, "query")
    index = gd.Index.build(
        model, train, k=16, store=str(tmp_path / "api"), workers=1, overrides=SETTINGS
    )
    result = index.attribute(query, damping=0.1, topk=5)
    by_api = index.gradient_index

    # The summaries are the jobs' own, key for key (`jobs.attribute` adds its later stages).
    assert index.summary["index"]["rows"] == summary["index"]["rows"] == 120
    assert index.summary["compression"] == summary["compression"]
    assert index.summary["index_url"] == by_api.store.url_of("")
    job_only = {"precondition", "score", "report", "index_bytes", "total_seconds"}
    assert set(index.summary) == set(summary) - job_only
    assert set(result.summary) >= {"precondition", "score", "stage_seconds", "compression"}
    rows_jobs, phi_jobs = _rows(by_jobs)
    rows_api, phi_api = _rows(by_api)
    np.testing.assert_array_equal(rows_api, rows_jobs)
    assert phi_api.keys() == phi_jobs.keys()
    for layer in phi_jobs:
        np.testing.assert_array_equal(phi_api[layer], phi_jobs[layer])
    for key in ("format_version", "compression", "layers", "dtype", "task"):
        assert by_api.fingerprint[key] == by_jobs.fingerprint[key], key
    assert by_api.fingerprint["model"]["state_sha256"] == state_hash(model)
    assert by_api.fingerprint["model"] == {
        **by_jobs.fingerprint["model"],
        "target": assembly.IN_MEMORY,
    }
    ours = result.topk()
    theirs = results.load_table(by_jobs, "default", "topk").to_pandas()
    cols = ["query_row", "query_key", "kind", "rank", "train_row", "train_key"]
    assert ours[cols].equals(theirs[cols])
    np.testing.assert_allclose(ours["score"], theirs["score"], rtol=1e-6)

    # Factories with the jobs' arguments give the jobs' fingerprint exactly.
    node = jobs.data["train"]
    again = job_config(
        functools.partial(digits_mlp, **{k: v for k, v in jobs.model.items() if k != "_target_"}),
        functools.partial(digits, **{k: v for k, v in node.items() if k != "_target_"}),
        k=16,
        store=summary["index_url"],
        overrides=SETTINGS,
    )
    assert pipeline.prepare(again, create_index=False).fingerprint == by_jobs.fingerprint

    # A later run of the same result set replaces this one: the older object refuses to
    # read (its files are gone) rather than hand back the later run's scores.
    later = index.attribute(query, damping=100.0, topk=5)
    with pytest.raises(ResultsNotFoundError, match="replaced by a later run"):
        result.topk()
    assert not later.topk()["score"].equals(ours["score"])
    # A read the call did not write names the argument that writes it.
    with pytest.raises(ResultsNotFoundError, match=r"(?s)scoring\.dense=true.*dense= sets"):
        later.dense()


@pytest.mark.integration
def test_readme_python_api_runs_as_written(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", readme_snippet()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(300, 20)" in out.stdout
    assert "train_row" in out.stdout
    assert (tmp_path / "outputs" / "api_index" / "index.json").exists()
    assert len(readme_snippet().strip().splitlines()) <= 15


@pytest.mark.integration
def test_a_model_that_returns_its_logits_in_a_dict_is_attributed_as_the_bare_one(
    ray_session, tmp_path
):
    inner = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.rand(40, 4), torch.arange(40) % 3
    train, query = TensorDataset(x, y), TensorDataset(x[:5], y[:5])
    dense = {}
    for name, model in (("bare", inner), ("dict", Outputs(inner, "dict"))):
        # Identity compression: the layers' names differ ("0" and "inner.0"), and so would
        # the projections seeded by them.
        index = gd.Index.build(model, train, store=str(tmp_path / name), workers=1,
                               compression="identity",
                               overrides=[f"run.output_dir={tmp_path}"])  # fmt: skip
        dense[name] = index.attribute(query, dense=True).dense()
    np.testing.assert_allclose(dense["dict"], dense["bare"], rtol=1e-6, atol=1e-6)
    said = r"the model returned a tuple, neither a tensor of logits nor an output with a 'logits'"
    with pytest.raises(ConfigError, match=said):
        gd.Index.build(Outputs(inner, "tuple"), train, store=str(tmp_path / "t"), workers=1)


@pytest.mark.integration
def test_gradients_too_large_for_float16_stop_the_build_and_bfloat16_holds_them(
    ray_session, tmp_path
):
    # Rows 40..43 have inputs 1e6 times larger and a label the model gets wrong, so their
    # gradients reach ~1e6: finite in float32, inf in float16 (at most 65504).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    x[40:44] *= 1e6
    with torch.no_grad():
        y[40:44] = (model(x[40:44]).argmax(1) + 1) % 3
    train = TensorDataset(x, y)
    settings = dict(k=8, workers=1)
    sizes = [f"run.output_dir={tmp_path}", "index.shard_size=32"]
    with pytest.raises(StorageOverflowError) as refused:
        gd.Index.build(model, train, store=str(tmp_path / "f16"), **settings,
                       overrides=[*sizes, "index.dtype=float16"])  # fmt: skip
    said = str(refused.value)
    assert said.startswith("rows [40, 41, 42, 43] (keys ['40', '41', '42', '43']) have ")
    assert "index.dtype=float16 holds at most 65504" in said
    assert (
        "Fix: rebuild the index with index.dtype=bfloat16 (or float32) in a new store.url" in said
    )
    # Nothing of the refused shard (rows 32..63) was written; one committed before is whole.
    f16 = GradientIndex.open(str(tmp_path / "f16"))
    assert [(r.start, r.end) for r in f16.committed().values()] in ([], [(0, 32)])
    written = {p.parent.name for p in (tmp_path / "f16" / "shards").glob("*/*")}
    assert written <= {"000000000000-000000000032"}
    for _, data in f16.iter_committed():
        assert all(np.isfinite(v).all() for v in data.phi.values())

    index = gd.Index.build(model, train, store=str(tmp_path / "bf16"), **settings,
                           overrides=[*sizes, "index.dtype=bfloat16"])  # fmt: skip
    assert index.summary["index"]["rows"] == 64
    rows, phi = _rows(index.gradient_index)
    assert rows.tolist() == list(range(64)) and np.abs(phi["0"][40:44]).max() > 65504
    assert all(np.isfinite(v).all() for v in phi.values())


@pytest.mark.integration
def test_an_in_memory_training_set_grows_and_a_changed_row_is_named(ray_session, tmp_path):
    # As with the jobs' files: the index of the first 40 rows resumes for 70 rows, and a
    # changed row is refused by its number and key, not as another dataset's fingerprint.
    model = digits_mlp(hidden=[8], epochs=0, n_train=40, n_query=5, cache_dir=str(tmp_path))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(70, 64, generator=gen), torch.randint(0, 10, (70,), generator=gen)
    settings = dict(store=str(tmp_path / "i"), k=8, workers=1,
                    overrides=[f"run.output_dir={tmp_path}", "index.shard_size=20"])  # fmt: skip
    first = gd.Index.build(model, TensorDataset(x[:40], y[:40]), **settings)
    grown = gd.Index.build(model, TensorDataset(x, y), **settings)
    again = gd.Index.build(model, TensorDataset(x, y), **settings)
    built = [s.summary["index"] for s in (first, grown, again)]
    assert [b["rows"] for b in built] == [40, 30, 0]
    assert [b["skipped_shards"] for b in built] == [0, 2, 4]
    x[25, 3] += 1.0
    with pytest.raises(DataMismatchError, match=r"first row 25 \(key '25'\)"):
        gd.Index.build(model, TensorDataset(x, y), **settings)
