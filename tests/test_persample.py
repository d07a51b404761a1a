"""Non-Linear layers: exact per-sample gradients through torch.func, then flat compressors."""

import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import default_collate

from grass_dist.compress import FlatShape, LinearShape, build_compressors, method_for
from grass_dist.config import CompressionConfig, JobConfig
from grass_dist.errors import ConfigError
from grass_dist.gradients.capture import resolve_layers
from grass_dist.gradients.computer import GradientComputer
from grass_dist.tasks.classifier import ClassificationTask
from tests.conftest import compose_cfg
from tests.helpers import ConvNet, EmbedNet, layer_grad, module_grad, per_sample_grads
from tests.test_no_weight_gemm import MatmulLog, weight_gradient_gemms

LAYERS = ["conv", "norm", "head"]


def _conv_case():
    torch.manual_seed(0)
    return ConvNet(), torch.randn(6, 1, 5, 5), torch.randint(0, 3, (6,))


def _computer(model, cfg, layers):
    comps = build_compressors(cfg, resolve_layers(model, layers))
    return GradientComputer(model, ClassificationTask(), comps), comps


def test_shapes_of_non_linear_layers():
    shapes = resolve_layers(ConvNet(), LAYERS)
    assert shapes["conv"] == FlatShape("Conv2d", (("weight", (3, 1, 3, 3)), ("bias", (3,))))
    assert shapes["conv"].numel == 30 and shapes["norm"].numel == 54
    assert shapes["head"] == LinearShape(27, 3, True)


def test_identity_on_mixed_layers_equals_torch_func_gradients():
    model, x, y = _conv_case()
    computer, _ = _computer(model, CompressionConfig(method="identity", other="identity"), LAYERS)
    with MatmulLog() as log:
        phi = computer.phi_batch([x, y])
    # Neither pass (hooks for the Linear head, torch.func for the rest) runs the head's
    # (3, 27) weight-gradient GEMM; the batch of 6 keeps other shapes apart from it.
    assert log.calls and weight_gradient_gemms(log, model) == []
    exact = per_sample_grads(model, x, y)
    for layer in ("conv", "norm"):
        torch.testing.assert_close(phi[layer], module_grad(exact, layer), rtol=1e-5, atol=1e-6)
    want = layer_grad(exact, "head").reshape(6, -1)
    torch.testing.assert_close(phi["head"], want, rtol=1e-5, atol=1e-6)


def test_flat_grass_is_sjlt_of_masked_per_sample_gradient():
    model, x, y = _conv_case()
    cfg = CompressionConfig(method="factgrass", other="grass", k=6, blowup=2, seed=3)
    computer, comps = _computer(model, cfg, LAYERS)
    phi = computer.phi_batch([x, y])
    exact = per_sample_grads(model, x, y)
    for layer in ("conv", "norm"):
        c = comps[layer]
        assert c.method == "grass" and c.idx.numel() == 12
        want = module_grad(exact, layer)[:, c.idx] @ c.sjlt.matrix()
        torch.testing.assert_close(phi[layer], want, rtol=1e-4, atol=1e-5)
    head = comps["head"]
    assert head.method == "factgrass"
    g = layer_grad(exact, "head")[:, head.idx_out][:, :, head.idx_in].reshape(6, -1)
    torch.testing.assert_close(phi["head"], g @ head.sjlt.matrix(), rtol=1e-4, atol=1e-5)


def test_embedding_gradients_and_dict_batches():
    torch.manual_seed(1)
    model = EmbedNet()
    ids, y = torch.randint(0, 11, (5, 4)), torch.randint(0, 3, (5,))
    computer, _ = _computer(
        model, CompressionConfig(method="identity", other="identity"), ["embed", "head"]
    )
    rows = [{"input": ids[i], "label": y[i], "note": "text"} for i in range(5)]
    block = computer.phi_rows(rows, range(5), batch_size=2)
    exact = per_sample_grads(model, ids, y)
    got = torch.from_numpy(block.phi["embed"])
    torch.testing.assert_close(got, module_grad(exact, "embed"), rtol=1e-5, atol=1e-6)


def test_read_only_numpy_rows_collate_silently_as_torch_does():
    # Rows shipped through Ray arrive as read-only numpy views; torch.as_tensor warns on each.
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    x.setflags(write=False)
    rows = [(x[i], i % 2) for i in range(3)] + [(x[0], 1)]
    dicts = [{"input": x[i], "label": np.int64(i)} for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, got_dicts = ClassificationTask().collate(rows), ClassificationTask().collate(dicts)
    want = default_collate([(a.copy(), b) for a, b in rows])
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)
    assert torch.equal(got_dicts["input"], torch.from_numpy(x.copy()))
    with pytest.raises(TypeError, match="found <U1"):  # torch's own refusal, unchanged
        ClassificationTask().collate([np.array(["a"]), np.array(["b"])])


def test_method_per_layer_type_and_overrides():
    shapes = resolve_layers(ConvNet(), LAYERS)
    cfg = CompressionConfig(
        method="logra",
        other="sjlt",
        overrides={"LayerNorm": "identity"},
        whole_small_layers=False,
    )
    assert method_for(cfg, "conv", shapes["conv"]) == ("sjlt", "compression.other")
    assert method_for(cfg, "norm", shapes["norm"])[0] == "identity"
    assert method_for(cfg, "head", shapes["head"]) == ("logra", "compression.method")
    cfg = CompressionConfig(
        overrides={"head": "gaussian", "Linear": "sjlt"}, whole_small_layers=False
    )
    assert method_for(cfg, "head", shapes["head"])[0] == "gaussian"
    with pytest.raises(ConfigError, match="'conv' is a Conv2d"):
        build_compressors(CompressionConfig(k=4, overrides={"conv": "logra"}), shapes)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("compression.other=factgrass", "compression.other='factgrass' is factorised"),
        ("compression.method=nope", r"compression.method='nope' is unknown; choose one of"),
        ("+compression.overrides.fc1=bad", r"compression.overrides.fc1='bad' is unknown"),
        ("compression.selective.holdout=0", "compression.selective needs"),
    ],
)
def test_bad_compression_configs_are_refused(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        JobConfig.from_cfg(OmegaConf.to_container(compose_cfg(tmp_path, override), resolve=True))


def test_parameterless_module_is_refused():
    with pytest.raises(ConfigError, match="'pool', a MaxPool2d without parameters"):
        model = nn.Sequential(OrderedDict(fc=nn.Linear(2, 2), pool=nn.MaxPool2d(2)))
        resolve_layers(model, ["fc", "pool"])
