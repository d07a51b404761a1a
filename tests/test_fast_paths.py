"""The capture's fast paths (gradients/fast_paths.py, tasks/lm_head.py) against autograd.

A causal LM's batches in a GradientComputer take the fused head and loss where the model's
logits are its plain head's output, which its first batch checks by watching the head.
Tests run several batches, so the first and the later ones are checked against per-sample
autograd on the unmodified model.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grass_dist.compress import build_compressors
from grass_dist.config import CompressionConfig
from grass_dist.errors import ConfigError
from grass_dist.gradients import computer as computer_module
from grass_dist.gradients.capture import resolve_layers
from grass_dist.gradients.computer import GradientComputer
from grass_dist.gradients.fast_paths import (
    activation_gradients,
    activation_gradients_only,
    fusable_modules,
)
from grass_dist.tasks import lm_head
from grass_dist.tasks.language_model import CausalLMTask
from tests.test_lm import direct_grad, make_items, rel_err, tiny_lm


class Capped(nn.Module):
    """A causal LM whose logits are soft-capped after its head (as Gemma 2's are)."""

    def __init__(self, inner: nn.Module, from_call: int = 0):
        super().__init__()
        self.inner, self.from_call, self.calls = inner, from_call, 0

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):
        self.calls += 1
        logits = self.inner(**kwargs).logits
        if self.calls > self.from_call:
            logits = torch.tanh(logits / 2) * 2
        return SimpleNamespace(logits=logits)


def _computer(model, layers=None, reduction="sum"):
    cfg = CompressionConfig(method="identity", k=8, seed=3)
    comps = build_compressors(cfg, resolve_layers(model, layers))
    return GradientComputer(model, CausalLMTask(reduction), comps)


def _fused_calls(monkeypatch) -> list[int]:
    calls = []
    apply = lm_head._HeadLoss.apply
    monkeypatch.setattr(lm_head._HeadLoss, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


def _assert_per_sample_autograd(model, comp, items, batch_size, reduction="sum"):
    block = comp.phi_rows(items, range(len(items)), batch_size=batch_size)
    for row, item in enumerate(items):
        want = direct_grad(model, item, list(comp.compressors))
        if reduction == "mean":
            count = max(1, int((item["labels"][1:] != -100).sum()))
            want = {n: w / count for n, w in want.items()}
        for name in comp.compressors:
            got = torch.from_numpy(block.phi[name][row])
            assert rel_err(got, want[name].reshape(-1)) < 1e-5, (name, row)


@pytest.mark.parametrize(
    ("arch", "layers", "reduction"),
    [
        ("gpt2", None, "sum"),  # GPT-2's head is tied to its embedding, never captured
        ("gpt2", None, "mean"),
        ("llama", ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"], "sum"),
    ],
)
def test_the_fused_head_gives_per_sample_autograd_gradients(arch, layers, reduction, monkeypatch):
    model = tiny_lm(arch)
    fused = _fused_calls(monkeypatch)
    items = make_items([5, 11, 8, 3, 9, 2, 7])  # padded batches, ignored labels
    comp = _computer(model, layers, reduction)
    _assert_per_sample_autograd(model, comp, items, batch_size=3, reduction=reduction)
    assert len(fused) == 3  # every batch, the first (which also watches the head) included
    assert lm_head._checked[model] == (model.get_output_embeddings(), True)


def test_a_captured_head_keeps_the_usual_path(monkeypatch):
    model = tiny_lm("llama")
    fused = _fused_calls(monkeypatch)
    comp = _computer(model, ["lm_head", "model.layers.1.mlp.down_proj"])
    _assert_per_sample_autograd(model, comp, make_items([5, 11, 8, 3]), batch_size=2)
    assert fused == []


def test_logits_changed_after_the_head_keep_the_usual_path(monkeypatch):
    inner = tiny_lm("gpt2")
    model = Capped(inner)
    fused = _fused_calls(monkeypatch)
    comp = _computer(model, ["inner.transformer.h.1.mlp.c_fc"])
    _assert_per_sample_autograd(model, comp, make_items([5, 11, 8, 3]), batch_size=2)
    assert fused == []
    assert lm_head._checked[model][1] is False


def test_logits_that_change_path_after_the_first_batch_are_an_error():
    model = Capped(tiny_lm("gpt2"), from_call=1)
    comp = _computer(model, ["inner.transformer.h.1.mlp.c_fc"])
    with pytest.raises(ConfigError, match="not on a later one.*task.fused_head=false"):
        comp.phi_rows(make_items([5, 11, 8, 3]), range(4), batch_size=2)
    off = GradientComputer(
        Capped(tiny_lm("gpt2"), from_call=1), CausalLMTask(fused_head=False), comp.compressors
    )
    off.phi_rows(make_items([5, 11, 8, 3]), range(4), batch_size=2)


def test_the_fused_loss_and_gradient_equal_cross_entropys():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(37, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(29, 12, generator=gen, dtype=torch.float64) * 40  # probabilities to 1e-300
    b = torch.randn(29, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 29, (37,), generator=gen)
    t[[0, 5, 36]] = lm_head.IGNORE
    scale = torch.rand(37, generator=gen, dtype=torch.float64)
    want = F.cross_entropy(F.linear(h, w, b), t, ignore_index=lm_head.IGNORE, reduction="none")
    (want_grad,) = torch.autograd.grad((want * scale).sum(), h)
    old = lm_head._CHUNK_ELEMENTS
    try:
        lm_head._CHUNK_ELEMENTS = 29 * 8  # five chunks of 8 rows, the last of 5
        got = lm_head._HeadLoss.apply(h, w, b, t)
    finally:
        lm_head._CHUNK_ELEMENTS = old
    (got_grad,) = torch.autograd.grad((got * scale).sum(), h)
    assert torch.isfinite(want).all() and want.max() > 100
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-8)  # float32 losses
    assert (got[[0, 5, 36]] == 0).all() and (got_grad[[0, 5, 36]] == 0).all()


@pytest.mark.parametrize("confidence", [0.0, 5.0, 10.0])
def test_the_fused_gradients_float32_error_is_the_usual_paths(confidence):
    """In float32 the loss's gradient at the head's input loses digits as the target's
    probability nears 1 (p_t - 1 cancels) on any path; the fused one (its softmax normalised
    on the (tokens, d) product) stays within a few times the usual log-softmax path's error
    against a float64 reference, and near float32's rounding for unconfident rows."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(1000, 64, generator=gen, dtype=torch.float64) * 0.3
    t = torch.randint(0, 1000, (256,), generator=gen)
    toward = w[t] / w[t].norm(dim=1, keepdim=True)
    h = torch.randn(256, 64, generator=gen, dtype=torch.float64) + confidence * toward
    p = torch.softmax(h @ w.T, 1)
    exact = (p - F.one_hot(t, 1000)) @ w

    def error(grad: torch.Tensor) -> float:
        return float(((grad.double() - exact).norm(dim=1) / exact.norm(dim=1)).median())

    h32 = h.float().requires_grad_()
    lm_head._HeadLoss.apply(h32, w.float(), None, t).sum().backward()
    fused = error(h32.grad)
    h32 = h.float().requires_grad_()
    F.cross_entropy(h32 @ w.float().T, t, reduction="sum").backward()
    usual = error(h32.grad)
    assert fused <= 3 * usual + 1e-6, (fused, usual)
    if confidence == 0.0:
        assert fused < 1e-6


def test_training_outside_the_capture_gets_the_heads_weight_gradient():
    model = tiny_lm("gpt2")
    comp = _computer(model)
    items = make_items([5, 11, 8, 3])
    comp.phi_rows(items, range(4), batch_size=2)  # the model is now known to be fusable
    batch = comp.task.collate(items)
    model.zero_grad(set_to_none=True)
    comp.task.per_sample_loss(model, batch).sum().backward()
    want = model.get_output_embeddings().weight.grad.clone()
    model.zero_grad(set_to_none=True)
    logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    targets = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="sum").backward()
    torch.testing.assert_close(want, model.get_output_embeddings().weight.grad)


def test_new_gelu_runs_as_pytorchs_tanh_gelu_inside_the_block_only():
    model = tiny_lm("gpt2")
    found = fusable_modules(model)
    assert [type(m).__name__ for m, _ in found] == ["NewGELUActivation"] * 2
    module = found[0][0]
    x = torch.randn(4, 7, 64) * 3
    usual = module(x)
    assert not activation_gradients_only()
    with activation_gradients(found):
        assert activation_gradients_only()
        assert "forward" in vars(module)
        fused = module(x)
        with contextlib.suppress(ValueError), activation_gradients(found):
            raise ValueError
        assert activation_gradients_only()  # a nested block's exit leaves the outer one on
        assert all(vars(m)["forward"] is k for m, k in found)  # and its kernels swapped in
    assert not activation_gradients_only()
    assert all("forward" not in vars(m) for m, _ in found)
    torch.testing.assert_close(fused, usual, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(module(x), usual, rtol=0, atol=0)


def test_fast_paths_change_the_phi_of_a_gpt2_by_float_rounding_only(monkeypatch):
    items = make_items([5, 11, 8, 3, 9, 2])
    fast = _computer(tiny_lm("gpt2")).phi_rows(items, range(6), batch_size=2)
    monkeypatch.setattr(
        computer_module, "activation_gradients", lambda _m: contextlib.nullcontext()
    )
    usual = _computer(tiny_lm("gpt2")).phi_rows(items, range(6), batch_size=2)
    for name, phi in usual.phi.items():
        assert rel_err(torch.from_numpy(fast.phi[name]), torch.from_numpy(phi)) < 1e-6, name


def test_a_rows_phi_does_not_depend_on_which_batch_came_first():
    items = make_items([6, 6, 6, 6])  # one length: batches follow the rows' order
    first = _computer(tiny_lm("gpt2")).phi_rows(items, [0, 1, 2, 3], batch_size=2)
    later = _computer(tiny_lm("gpt2")).phi_rows(items, [2, 3, 0, 1], batch_size=2)
    for name, phi in first.phi.items():
        assert np.array_equal(phi[[2, 3, 0, 1]], later.phi[name]), name
