"""Causal self-attention in blocks of query rows, for CPU batches inside `activation_gradients`.

PyTorch's CPU flash-attention kernel computes the whole (T, T) score matrix of a causal
self-attention in its backward pass, although every score above the diagonal is masked.
Here the queries go in blocks of `BLOCK_ROWS` rows: the block of rows [lo, hi) attends to the
keys [0, hi) only, since every later key is masked for each of its rows anyway. The result
is the same function (it agrees with the one-call kernel to float rounding) for about
(n + 1) / 2n of the work in n blocks. An index batch of GPT-2 of width 256 (2 rows of 256
tokens, 4 heads, 4 blocks, vocabulary 8192) at one CPU thread took 76.2 ms with the
attention in blocks of 64 rows against 80.3 ms in one call (`python
bench/bench_fast_paths.py --docs 32 --rounds 3 --threads 1`, bench/results/vs_bergson.md).

It applies to transformers' "sdpa" attention (`transformers.integrations.sdpa_attention`)
where that attention is causal self-attention on the CPU, on a thread inside
`activation_gradients`: queries and keys of one length, at least two blocks long; no mask
(the module's causal flag) or a boolean mask that masks every score above the diagonal
(padding); no dropout, position bias, soft cap, attention weights asked for, or grouped
key/value heads. Anything else runs transformers' function unchanged. The swap is made in
transformers' attention registry (`AttentionInterface`), once per process, on the first
model seen using "sdpa" (`install`): outside `activation_gradients`, on another thread, and
for any other attention, the registered function is transformers' own, called as before.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from grass_dist.gradients.fast_paths import activation_gradients_only

BLOCK_ROWS = 64

_install_lock = threading.Lock()
_one_call = [False]  # set by `one_call`
_MARK = "_grass_dist_causal_blocks"
# device -> a lower-triangular (n, n) boolean mask for the longest rows seen there: a block's
# mask is a view of it, so what is kept is bounded by the longest rows, not by how many
# lengths come by.
_causal: dict[str, torch.Tensor] = {}
_seen = threading.local()  # the last mask `_applies` checked on this thread, and its answer


def install(model: nn.Module) -> bool:
    """Route transformers' "sdpa" attention through `blocked_attention` where `model` uses it
    and the registered "sdpa" function is transformers' own (else leave it: someone else's
    function is not ours to wrap). True where the route is in place."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False
    with _install_lock:
        current = AttentionInterface._global_mapping.get("sdpa")
        if getattr(current, _MARK, False):
            return True
        if current is not sdpa_attention_forward:
            return False
        AttentionInterface.register("sdpa", _routed(current))
        return True


@contextmanager
def one_call() -> Iterator[None]:
    """Inside the block, on every thread, attention runs in transformers' one call (to
    compare, as bench/ does)."""
    kept, _one_call[0] = _one_call[0], True
    try:
        yield
    finally:
        _one_call[0] = kept


def _routed(original: Callable[..., Any]) -> Callable[..., Any]:
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if _applies(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
            out = blocked_attention(query, key, value, attention_mask, scaling)
            return out.transpose(1, 2).contiguous(), None
        return original(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )

    setattr(attention, _MARK, True)
    attention.__wrapped__ = original  # type: ignore[attr-defined]
    return attention


def _applies(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    is_causal: bool | None,
    kwargs: dict[str, Any],
) -> bool:
    if _one_call[0] or not activation_gradients_only() or dropout != 0.0:
        return False
    if kwargs.get("softcap") is not None or kwargs.get("output_attentions"):
        return False
    if kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None:
        return False
    if getattr(module, "num_key_value_groups", 1) != 1 or query.device.type != "cpu":
        return False
    if query.dim() != 4 or key.shape[:3] != query.shape[:3] or value.shape[:3] != key.shape[:3]:
        return False
    length = query.shape[2]
    if length < 2 * BLOCK_ROWS:
        return False
    if mask is None:
        return bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    # Every layer of a forward gets the same mask: check it once, not once per layer.
    last = getattr(_seen, "mask", None)
    if last is not None and last[0]() is mask:
        return last[1]
    causal = is_causal_mask(mask, length)
    _seen.mask = (weakref.ref(mask), causal)
    return causal


def is_causal_mask(mask: torch.Tensor, length: int) -> bool:
    """Whether `mask` is a boolean (..., length, length) mask that masks every score above
    the diagonal (it may mask more: padding)."""
    if mask.dtype != torch.bool or mask.dim() < 2 or mask.shape[-2:] != (length, length):
        return False
    return not bool(mask.triu(1).any())


def blocked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal self-attention (B, H, T, D) -> (B, H, T, D) in blocks of query rows: with no
    `mask`, the causal one; with one, a boolean (..., T, T) mask that masks every score above
    the diagonal (`is_causal_mask`)."""
    length = query.shape[2]
    full = mask if mask is not None else _causal_mask(query.device, length)
    blocks = []
    for lo in range(0, length, BLOCK_ROWS):
        hi = min(lo + BLOCK_ROWS, length)
        q, k, v = query[:, :, lo:hi], key[:, :, :hi], value[:, :, :hi]
        if mask is None and lo == 0:  # a square block: the kernel's own causal flag
            blocks.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
        else:
            block_mask = full[..., lo:hi, :hi]
            blocks.append(
                F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask, scale=scale)
            )
    return torch.cat(blocks, dim=2)


def _causal_mask(device: torch.device, length: int) -> torch.Tensor:
    """A lower-triangular boolean mask of at least (length, length) on `device`."""
    known = _causal.get(str(device))
    if known is None or known.shape[0] < length:
        known = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        _causal[str(device)] = known
    return known
