"""A CNN on the digits attributed end to end: Conv2d layers through flat GraSS."""

import pytest
import torch
from omegaconf import OmegaConf

from grass_dist import results, run
from grass_dist.build import build_dataset, build_layer_compressors, build_model
from grass_dist.config import JobConfig
from grass_dist.index import GradientIndex
from tests.conftest import compose_cfg
from tests.helpers import layer_grad, module_grad, per_sample_grads

pytestmark = pytest.mark.integration

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


def _direct_phi(model, comps, ds) -> dict[str, torch.Tensor]:
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
    phi_t, phi_q = _direct_phi(model, comps, train), _direct_phi(model, comps, query)
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
