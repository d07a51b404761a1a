"""Learned (selective) masks live in the index and are what every worker and query uses."""

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from grass_dist import learned, pipeline
from grass_dist.build import build_dataset, build_model
from grass_dist.compress import SJLT
from grass_dist.errors import CorruptIndexError, FingerprintMismatchError
from grass_dist.index import GradientIndex
from grass_dist.seeding import generator
from tests.conftest import compose_cfg
from tests.helpers import layer_grad, per_sample_grads

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
        state = st_load(index.get_artifact(f"compressors/{name}.safetensors"))
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
        data = index.get_artifact(f"compressors/{spec['name']}.safetensors")
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

    monkeypatch.setattr(learned, "fit_states", no_fit)
    again = pipeline.prepare(cfg)
    assert again.fingerprint == index.fingerprint
    with pytest.raises(FingerprintMismatchError, match=r"layers\[0\].selective.epochs"):
        pipeline.prepare(compose_cfg(tmp_path, *SELECTIVE, "compression.selective.epochs=31"))
    index.store.delete("compressors/out.safetensors")
    with pytest.raises(CorruptIndexError, match="compressors/out.safetensors"):
        pipeline.prepare(cfg)
