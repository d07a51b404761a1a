"""Linear layers' products through oneDNN inside the capture (gradients/dnn_linear.py):
the same function as PyTorch's to float rounding, forward and input gradient; the layers
it routes; per-sample gradients through it equal autograd's on the unmodified model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grass_dist.gradients import dnn_linear
from grass_dist.gradients.fast_paths import activation_gradients, fusable_modules
from grass_dist.models.hf import hf_causal_lm
from tests.test_fast_paths import _assert_per_sample_autograd, _computer
from tests.test_lm import VOCAB, make_items

needs_onednn = pytest.mark.skipif(
    not dnn_linear.available(), reason="this torch has no usable oneDNN linear op"
)


def _conv1d(nx, nf):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    return Conv1D(nf, nx)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_routed_layer_is_its_own_forward_and_input_gradient(kind, monkeypatch):
    torch.manual_seed(1)
    layer = nn.Linear(130, 140) if kind == "linear" else _conv1d(130, 140)
    assert dnn_linear.routed(layer)
    x = torch.randn(3, 7, 130, requires_grad=True)
    upstream = torch.randn(3, 7, 140)
    want = layer(x)
    (want_grad,) = torch.autograd.grad(want, x, upstream)
    forward = dnn_linear.linear_forward(layer)
    calls = []
    routed_linear = dnn_linear.linear
    monkeypatch.setattr(
        dnn_linear, "linear", lambda *a: calls.append(a[0].shape) or routed_linear(*a)
    )
    got = forward(x)
    (got_grad,) = torch.autograd.grad(got, x, upstream)
    monkeypatch.undo()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    assert got.requires_grad and layer.weight.grad is None  # the parameters get none
    assert calls == [(3, 7, 130), (3, 7, 140)]
    # Another dtype takes the layer's own forward, bit for bit.
    layer64, x64 = layer.double(), x.detach().double()
    assert torch.equal(dnn_linear.linear_forward(layer64)(x64), layer64(x64))


@needs_onednn
def test_linear_is_onednns_product_and_pytorchs_inside_pytorch_gemms(monkeypatch):
    calls = []
    op = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(dnn_linear, "_found", [lambda *a: calls.append(1) or op(*a)])
    x, w, b = torch.randn(64, 128), torch.randn(256, 128), torch.randn(256)
    torch.testing.assert_close(dnn_linear.linear(x, w, b), F.linear(x, w, b))
    torch.testing.assert_close(dnn_linear.linear(x, w.t().contiguous().t()), x @ w.T)
    assert len(calls) == 2
    with dnn_linear.pytorch_gemms():
        assert torch.equal(dnn_linear.linear(x, w, b), F.linear(x, w, b))
    assert len(calls) == 2
    dnn_linear.linear(x.double(), w.double())  # another dtype: F.linear
    assert len(calls) == 2


def test_which_layers_are_routed():
    class MyLinear(nn.Linear):
        pass

    assert dnn_linear.routed(nn.Linear(128, 128))
    assert not dnn_linear.routed(nn.Linear(127, 128))  # under MIN_WEIGHT entries
    assert not dnn_linear.routed(MyLinear(256, 256))  # a subclass may compute otherwise
    assert dnn_linear.routed(_conv1d(128, 384))
    assert not dnn_linear.routed(_conv1d(16, 48))
    assert not dnn_linear.routed(nn.Conv1d(128, 128, 1))


def test_the_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv("GRASS_DIST_ONEDNN", "0")
    assert dnn_linear._checked_op() is None


def _wide_lm(arch):
    if arch == "gpt2":  # every block projection routed: 128 x 384, 128 x 128, 128 x 512, ...
        config = {"n_layer": 2, "n_head": 2, "n_embd": 128, "n_positions": 64}
    else:  # q, o, up, down, gate routed; k and v (128 x 64) kept
        config = {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
        }
    config.update(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    return hf_causal_lm(arch, config, dtype="float32", seed=0)


@needs_onednn
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_per_sample_gradients_through_routed_layers_equal_autograds(arch, monkeypatch):
    model = _wide_lm(arch)
    routed = [m for m, _ in fusable_modules(model) if dnn_linear.routed(m)]
    assert len(routed) == (8 if arch == "gpt2" else 10)
    assert model.get_output_embeddings() not in routed  # the fused head computes it
    calls = []
    routed_linear = dnn_linear.linear
    monkeypatch.setattr(dnn_linear, "linear", lambda *a: calls.append(1) or routed_linear(*a))
    comp = _computer(model)
    _assert_per_sample_autograd(model, comp, make_items([5, 11, 8, 3, 9]), batch_size=2)
    assert calls  # the batches took the routed products
    with activation_gradients(comp.fused):
        assert all("forward" in vars(m) for m in routed)
    assert all("forward" not in vars(m) for m in routed)
