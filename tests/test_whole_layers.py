"""compression.whole_small_layers: a layer with at most k gradient entries is kept whole.

No method can compress such a layer to k, so with the switch on (the default) it is indexed
with its exact per-sample gradient (method identity, recorded in the fingerprint and the job
summary); with the switch off it is refused, naming the layer and the switch.
"""

from __future__ import annotations

import pytest
import ray
import torch

from grass_dist import pipeline
from grass_dist.compress import (
    IdentityCompressor,
    build_compressors,
    learned_layers,
    whole_layers,
)
from grass_dist.config import CompressionConfig
from grass_dist.errors import ConfigError
from grass_dist.gradients.capture import resolve_layers
from grass_dist.gradients.computer import GradientComputer
from grass_dist.summary import compression_summary
from grass_dist.tasks.classifier import ClassificationTask
from tests.conftest import compose_cfg
from tests.helpers import ConvNet, layer_grad, mlp, module_grad, per_sample_grads

# mlp(): fc1 has 8 x (6 + 1) = 56 gradient entries, out 4 x (8 + 1) = 36.
K = 40


def _phi(model, cfg: CompressionConfig, layers, x, y):
    comps = build_compressors(cfg, resolve_layers(model, layers))
    task = ClassificationTask()
    batch = task.collate(list(zip(x, y, strict=True)))
    return comps, GradientComputer(model, task, comps).phi_batch(batch)


@pytest.mark.parametrize("method", ["factgrass", "logra", "grass", "sjlt", "gaussian"])
def test_a_linear_layer_with_at_most_k_entries_is_indexed_whole(method):
    model = mlp()
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    cfg = CompressionConfig(method=method, k=K)
    comps, phi = _phi(model, cfg, None, x, y)
    assert whole_layers(cfg, resolve_layers(model, None)) == ["out"]
    assert isinstance(comps["out"], IdentityCompressor)
    assert comps["fc1"].method == method and phi["fc1"].shape == (5, K)
    exact = layer_grad(per_sample_grads(model, x, y), "out").reshape(5, -1)
    torch.testing.assert_close(phi["out"], exact, rtol=1e-5, atol=1e-6)


def test_a_flat_layer_with_at_most_k_entries_is_indexed_whole():
    torch.manual_seed(0)
    model = ConvNet()  # conv: 3 x 1 x 3 x 3 + 3 = 30 entries; head: 3 x 28 = 84
    x, y = torch.randn(4, 1, 5, 5), torch.randint(0, 3, (4,))
    cfg = CompressionConfig(method="factgrass", other="grass", k=32)
    comps, phi = _phi(model, cfg, ["conv", "head"], x, y)
    assert [n for n, c in comps.items() if isinstance(c, IdentityCompressor)] == ["conv"]
    exact = module_grad(per_sample_grads(model, x, y), "conv")
    torch.testing.assert_close(phi["conv"], exact, rtol=1e-5, atol=1e-6)
    assert phi["head"].shape == (4, 32)


def test_a_layer_of_exactly_k_entries_is_kept_whole_and_a_larger_one_is_not():
    shapes = resolve_layers(mlp(), None)
    assert whole_layers(CompressionConfig(k=36), shapes) == ["out"]
    assert whole_layers(CompressionConfig(k=35), shapes) == []
    assert whole_layers(CompressionConfig(k=56), shapes) == ["fc1", "out"]


@pytest.mark.parametrize("method", ["factgrass", "logra", "grass", "random_mask", "rademacher"])
def test_switch_off_refuses_the_layer_naming_it_and_the_switch(method):
    cfg = CompressionConfig(method=method, k=K, whole_small_layers=False)
    with pytest.raises(ConfigError, match=r"layer 'out'.*compression\.whole_small_layers=true"):
        build_compressors(cfg, resolve_layers(mlp(), None))


def test_a_small_layer_needs_no_learned_mask():
    shapes = resolve_layers(mlp(), None)
    cfg = CompressionConfig(method="selective_factgrass", k=K)
    assert learned_layers(cfg, shapes) == ["fc1"]
    off = CompressionConfig(method="selective_factgrass", k=K, whole_small_layers=False)
    assert learned_layers(off, shapes) == ["fc1", "out"]


def test_job_records_whole_layers_in_fingerprint_and_summary(tmp_path):
    # The small digits MLP: fc1 64 -> 16 (1040 entries), out 16 -> 10 (170 entries).
    job = pipeline.prepare(compose_cfg(tmp_path, "compression.k=200"))
    assert not ray.is_initialized()
    layers = {d["name"]: d for d in job.fingerprint["layers"]}
    assert layers["out"]["method"] == "identity" and layers["out"]["k"] == 170
    assert layers["fc1"]["method"] == "factgrass" and layers["fc1"]["k"] == 200
    assert job.index.fingerprint == job.fingerprint
    summary = compression_summary(job)
    assert summary["whole_small_layers"] is True and summary["whole_layers"] == ["out"]
    assert (summary["k"], summary["row_dims"]) == (200, 200 + 170)
    # Identity keeps every layer whole: no k to speak of; each row stores both gradients.
    exact = compression_summary(
        pipeline.prepare(compose_cfg(tmp_path / "id", "compression=identity"))
    )
    assert (exact["method"], exact["k"], exact["row_dims"]) == ("identity", None, 1040 + 170)
