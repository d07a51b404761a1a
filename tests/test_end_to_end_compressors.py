"""End to end on Ray: learned (selective) masks live in the index and are what every worker
and query uses; a CNN's Conv2d layers go through flat GraSS."""

import hashlib

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load as st_load

from grass_dist import pipeline, run
from grass_dist.build import build_dataset, build_layer_compressors, build_model
from grass_dist.compress import SJLT
from grass_dist.config import JobConfig
from grass_dist.errors import CorruptIndexError, FingerprintMismatchError
from grass_dist.gradients import learned_state
from grass_dist.index import GradientIndex
from grass_dist.runtime.seeding import generator
from grass_dist.scoring import results
from tests.conftest import compose_cfg
from tests.helpers import layer_grad, module_grad, per_sample_grads

pytestmark = pytest.mark.integration

SELECTIVE = [
    "compression=selective_factgrass",
    "compression.k=32",
    "compression.selective.samples=40",
    "compression.selective.holdout=16",
    "compression.selective.epochs=30",
    "compression.selective.check_every=10",
]


def _direct_phi(job, index, which: str) -> dict[str, np.ndarray]:
    """phi from exact per-sample gradients, the stored masks and an independently drawn SJLT."""
    model = build_model(job.cfg)
    ds = build_dataset(job.cfg, which)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.stack([ds[i][1] for i in range(len(ds))])
    exact = per_sample_grads(model, x, y)
    out = {}
    for spec in index.fingerprint["layers"]:
        name = spec["name"]
        state = st_load(index.get_artifact(learned_state.state_path(name, spec["state_sha256"])))
        masked = layer_grad(exact, name)[:, state["idx_out"]][:, :, state["idx_in"]]
        k_prime = state["idx_out"].numel() * state["idx_in"].numel()
        sjlt = SJLT(k_prime, spec["k"], generator(spec["seed"], name, "sjlt"), c=spec["sjlt_c"])
        out[name] = (masked.reshape(len(ds), -1) @ sjlt.matrix()).numpy()
    return out


def test_selective_masks_are_stored_and_loaded_by_fresh_workers(ray_session, tmp_path, monkeypatch):
    cfg = compose_cfg(tmp_path, *SELECTIVE)
    job = pipeline.prepare(cfg)
    try:
        pipeline.run_index(job)
        query = pipeline.query_phi(job)  # computed by the worker actors (other processes)
    finally:
        pipeline.shutdown(job)
    index = GradientIndex.open(job.cfg.index_url)
    for spec in index.fingerprint["layers"]:
        data = index.get_artifact(learned_state.state_path(spec["name"], spec["state_sha256"]))
        assert spec["method"] == "selective_factgrass"
        assert spec["state_sha256"] == hashlib.sha256(data).hexdigest()
        assert spec["selective"]["samples"] == 40
    train_direct = _direct_phi(job, index, "train")
    query_direct = _direct_phi(job, index, "query")
    parts = [d for _, d in index.iter_committed()]
    for name in query.phi:
        stored = np.concatenate([d.phi[name] for d in parts])
        np.testing.assert_allclose(stored, train_direct[name], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(query.phi[name], query_direct[name], rtol=1e-4, atol=1e-6)

    # A rerun loads the masks from the index instead of fitting again.
    def no_fit(*args, **kwargs):
        raise AssertionError("masks were fitted again")

    monkeypatch.setattr(learned_state, "fit_states", no_fit)
    again = pipeline.prepare(cfg)
    assert again.fingerprint == index.fingerprint
    with pytest.raises(FingerprintMismatchError, match=r"layers\['fc1'\].selective.epochs"):
        pipeline.prepare(compose_cfg(tmp_path, *SELECTIVE, "compression.selective.epochs=31"))
    out_sha = next(d["state_sha256"] for d in index.fingerprint["layers"] if d["name"] == "out")
    out_state = learned_state.state_path("out", out_sha)
    index.store.delete(out_state)
    with pytest.raises(CorruptIndexError, match=out_state):
        pipeline.prepare(cfg)


CNN = [
    "model=digits_cnn",
    "model.channels=[4,8]",
    "model.hidden=16",
    "model.epochs=40",
    "data.train.n_train=90",
    "data.train.n_query=12",
    "index.layers=[conv1,conv2,fc1,out]",
    "index.shard_size=32",
    "index.batch_size=16",
    "cluster.cpus_per_worker=0.5",
    "compression.k=32",
    "scoring.dense=true",
    "precondition.damping=0.1",
]


def _direct_cnn_phi(model, comps, ds) -> dict[str, torch.Tensor]:
    """phi from exact per-sample gradients: SJLT(mask(flat grad)) or FactGraSS on factors."""
    x = torch.stack([ds[i][0] for i in range(len(ds))]).double()
    y = torch.stack([ds[i][1] for i in range(len(ds))])
    exact = per_sample_grads(model.double(), x, y)
    out = {}
    for name, c in comps.items():
        if c.method == "grass":
            masked = module_grad(exact, name)[:, c.idx]
        else:
            masked = layer_grad(exact, name)[:, c.idx_out][:, :, c.idx_in].flatten(1)
        out[name] = masked @ c.sjlt.matrix().double()
    return out


def test_cnn_attribution_with_flat_grass_conv_layers(ray_session, tmp_path):
    cfg = compose_cfg(tmp_path, *CNN, small=False)
    summary = run.attribute(cfg)
    assert summary["index"]["rows"] == 90
    index = GradientIndex.open(summary["index_url"])
    methods = {s["name"]: s["method"] for s in index.fingerprint["layers"]}
    assert methods == {"conv1": "grass", "conv2": "grass", "fc1": "factgrass", "out": "factgrass"}
    job = JobConfig.from_cfg(OmegaConf.to_container(cfg, resolve=True))
    model = build_model(job)
    comps = build_layer_compressors(job, model)
    train, query = build_dataset(job, "train"), build_dataset(job, "query")
    phi_t, phi_q = _direct_cnn_phi(model, comps, train), _direct_cnn_phi(model, comps, query)
    expected = torch.zeros(90, 12, dtype=torch.float64)
    for name in comps:
        h = phi_t[name].T @ phi_t[name] / 90
        lam = 0.1 * torch.trace(h) / h.shape[0]
        expected += phi_t[name] @ torch.linalg.solve(h + lam * torch.eye(h.shape[0]), phi_q[name].T)
    dense = torch.tensor(results.load_dense(index, "default"), dtype=torch.float64)
    rel = float((dense - expected).norm() / expected.norm())
    print(f"CNN dense scores vs direct: relative error {rel:.2e}")
    assert rel < 1e-3
    assert summary["report"]["query_accuracy"] > 0.5
