"""Causal self-attention in blocks of query rows (gradients/causal_attention.py): the same
function as one scaled_dot_product_attention call, forward and backward; taken by a
transformers "sdpa" model inside `activation_gradients` only, and only where the attention is
causal self-attention; per-sample gradients through it equal autograd's on the usual path."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from grass_dist.gradients import causal_attention
from grass_dist.gradients.causal_attention import BLOCK_ROWS, blocked_attention, is_causal_mask
from grass_dist.gradients.fast_paths import activation_gradients, fusable_modules
from grass_dist.models.hf import hf_causal_lm
from tests.test_fast_paths import _assert_per_sample_autograd, _computer
from tests.test_lm import VOCAB, make_items


def _qkv(length, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 3, length, 8)
    return [torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3)]


def _padding_mask(length, real):
    """(B, 1, T, T) causal boolean mask of left-padded rows with `real` tokens each."""
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    keys = torch.arange(length)[None, :] >= (length - torch.tensor(real))[:, None]  # (B, T)
    return causal[None, None] & keys[:, None, None, :]


@pytest.mark.parametrize("length", [2 * BLOCK_ROWS, 3 * BLOCK_ROWS + 17])
@pytest.mark.parametrize("masked", [False, True])
def test_blocks_equal_one_call_forward_and_backward(length, masked):
    q, k, v = _qkv(length)
    mask = _padding_mask(length, [length, length - 40]) if masked else None
    kwargs = {"attn_mask": mask} if masked else {"is_causal": True}
    want = F.scaled_dot_product_attention(q, k, v, scale=0.3, **kwargs)
    upstream = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), upstream)
    got = blocked_attention(q, k, v, mask, scale=0.3)
    got_grads = torch.autograd.grad(got, (q, k, v), upstream)
    rows = slice(40, None) if masked else slice(None)  # padded query rows: NaN on both sides
    torch.testing.assert_close(got[1, :, rows], want[1, :, rows], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.equal(g.isnan(), w.isnan())
        torch.testing.assert_close(g.nan_to_num(), w.nan_to_num(), rtol=1e-11, atol=1e-12)


def test_only_a_boolean_mask_hiding_everything_above_the_diagonal_is_causal():
    length = 130
    assert is_causal_mask(_padding_mask(length, [length, 7]), length)
    assert is_causal_mask(torch.ones(length, length, dtype=torch.bool).tril(), length)
    assert not is_causal_mask(torch.ones(1, 1, length, length, dtype=torch.bool), length)
    prefix = torch.ones(length, length, dtype=torch.bool).tril()
    prefix[:10, :10] = True  # a prefix LM: the prefix sees itself both ways
    assert not is_causal_mask(prefix, length)
    additive = torch.zeros(length, length).masked_fill(~prefix.tril(), float("-inf"))
    assert not is_causal_mask(additive, length)
    assert not is_causal_mask(prefix.tril()[:, :-1], length)


def _gpt2(attention="sdpa"):
    config = {"n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 256}
    config.update(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    model = hf_causal_lm("gpt2", config, dtype="float32", seed=0)
    model.set_attn_implementation(attention)
    return model


def _blocked_calls(monkeypatch) -> list[bool]:
    calls = []
    blocked = causal_attention.blocked_attention

    def counted(q, k, v, mask, scale):
        calls.append(mask is not None)
        return blocked(q, k, v, mask, scale)

    monkeypatch.setattr(causal_attention, "blocked_attention", counted)
    return calls


def test_a_gpt2s_per_sample_gradients_through_the_blocks_equal_autograds(monkeypatch):
    model = _gpt2()
    calls = _blocked_calls(monkeypatch)
    items = make_items([150, 150, 171, 140, 60])  # unpadded batches and a padded one
    comp = _computer(model)
    _assert_per_sample_autograd(model, comp, items, batch_size=2)
    # Three batches of two layers: two without padding (no mask: is_causal) and one padded
    # (a boolean mask), whichever order the task's batches come in.
    assert sorted(calls) == [False] * 4 + [True] * 2
    calls.clear()
    _assert_per_sample_autograd(model, comp, make_items([100, 127, 80]), batch_size=2)
    assert calls == []  # rows shorter than two blocks take transformers' call


def test_the_route_is_taken_inside_the_block_and_on_its_thread_only(monkeypatch):
    model = _gpt2()
    found = fusable_modules(model)
    calls = _blocked_calls(monkeypatch)
    ids = torch.randint(1, VOCAB, (2, 2 * BLOCK_ROWS))
    usual = model(input_ids=ids).logits
    assert calls == []
    seen = {}

    def elsewhere():
        seen["logits"] = model(input_ids=ids).logits

    with activation_gradients(found):
        fast = model(input_ids=ids).logits
        other = threading.Thread(target=elsewhere)
        other.start()
        other.join()
    assert calls == [False, False]  # this thread's two layers, not the other thread's
    torch.testing.assert_close(fast, usual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["logits"], usual, rtol=1e-5, atol=1e-6)
    assert torch.equal(model(input_ids=ids).logits, usual)


def test_other_attention_is_left_as_it_was(monkeypatch):
    from transformers.modeling_utils import AttentionInterface

    calls = _blocked_calls(monkeypatch)
    before = dict(AttentionInterface._global_mapping)
    assert not causal_attention.install(_gpt2("eager"))
    assert AttentionInterface._global_mapping == before
    ids = torch.randint(1, VOCAB, (1, 2 * BLOCK_ROWS))
    model = _gpt2("eager")
    with activation_gradients(fusable_modules(model)):
        model(input_ids=ids)
    assert calls == []
    # Someone else's "sdpa" function is not wrapped.
    assert causal_attention.install(_gpt2())
    routed = AttentionInterface._global_mapping["sdpa"]
    theirs = routed.__wrapped__

    def own(*args, **kwargs):
        return theirs(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", own)
    assert not causal_attention.install(_gpt2())
    assert AttentionInterface._global_mapping["sdpa"] is own


def test_a_forwards_mask_is_checked_once_and_block_masks_are_one_view(monkeypatch):
    model = _gpt2()
    found = fusable_modules(model)
    checks = []
    check = causal_attention.is_causal_mask
    monkeypatch.setattr(
        causal_attention, "is_causal_mask", lambda m, n: checks.append(n) or check(m, n)
    )
    ids = torch.randint(1, VOCAB, (2, 150))
    padding = torch.ones(2, 150, dtype=torch.long)
    padding[1, :20] = 0
    with activation_gradients(found):
        model(input_ids=ids, attention_mask=padding)
    assert checks == [150]  # two layers, one mask, one check
    monkeypatch.setattr(causal_attention, "_causal", {})
    for length in (130, 200, 140):
        q, k, v = _qkv(length)
        blocked_attention(q, k, v)
    assert [tuple(m.shape) for m in causal_attention._causal.values()] == [(200, 200)]
