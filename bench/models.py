"""Benchmark models built from nn.Linear, and a causal-LM task (torch only, no grass_dist).

Kept free of grass_dist imports so the dattri benchmark environment can load the same
models. Every model is randomly initialised from an explicit seed: throughput does not
depend on the weights.

- `gpt(...)`: GPT-shaped (pre-norm blocks: q, k, v, o projections + 4x MLP), learned
  positions, untied head.
- `llama(...)`: Llama-shaped (RMSNorm, rotary q/k, grouped-query attention, SwiGLU MLP).
- `digits_mlp_shape()`: the digits MLP's architecture (64 -> 128 -> 64 -> 10), random init.

Token inputs may carry extra leading singleton axes (dattri 0.3.0 builds its compressors
from one example, so its data items are (1, T)); models flatten them to (B, T).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class GPTBlock(nn.Module):
    """Pre-norm attention (separate q, k, v, o) and a GELU MLP of width 4d."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def qkv(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return self.q, self.k, self.v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).view(b, t, self.heads, -1).transpose(1, 2) for m in self.qkv())
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    """Token ids (..., T) -> logits (B, T, vocab)."""

    def __init__(self, vocab: int, width: int, layers: int, seq: int, heads: int):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, width), nn.Embedding(seq, width)
        self.blocks = nn.ModuleList(GPTBlock(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.reshape(-1, ids.shape[-1])
        x = self.emb(ids) + self.pos.weight[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def gpt(
    vocab: int = 4096, width: int = 512, layers: int = 4, seq: int = 128, heads: int = 8
) -> GPT:
    """The GPT-shaped benchmark model (random init from seed 0)."""
    torch.manual_seed(0)
    return GPT(vocab, width, layers, seq, heads).eval()


def rotary(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of (B, H, T, dh) queries or keys (half-split layout)."""
    t, dh = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh)
    ang = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class LlamaBlock(nn.Module):
    """RMSNorm, rotary grouped-query attention (no biases), SwiGLU MLP."""

    def __init__(self, d: int, heads: int, kv_heads: int, ffn: int):
        super().__init__()
        self.heads, self.kv_heads, self.dh = heads, kv_heads, d // heads
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.dh, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.dh, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q = rotary(self.q_proj(h).view(b, t, self.heads, self.dh).transpose(1, 2))
        k = rotary(self.k_proj(h).view(b, t, self.kv_heads, self.dh).transpose(1, 2))
        v = self.v_proj(h).view(b, t, self.kv_heads, self.dh).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    """Token ids (..., T) -> logits (B, T, vocab)."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, kv_heads: int, ffn: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(LlamaBlock(width, heads, kv_heads, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(width, eps=1e-5)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids.reshape(-1, ids.shape[-1]))
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


LLAMA_1B = {"vocab": 32000, "width": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "ffn": 8192}
LLAMA_TINY = {"vocab": 256, "width": 128, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 256}


def llama(dims: dict[str, int], dtype: torch.dtype, device: str | torch.device) -> Llama:
    """A Llama-shaped model of the given dims (LLAMA_1B: 1.1e9 parameters), random init."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(**dims)
    for p in model.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02)
    return model.to(dtype).eval()


def digits_mlp_shape() -> nn.Sequential:
    """The digits MLP (64 -> 128 -> 64 -> 10, ReLU; layers fc1, fc2, out), random init.

    The Flatten first lets dattri's one-example set-up pass (1, 64) items.
    """
    torch.manual_seed(0)
    layers = OrderedDict(
        flat=nn.Flatten(),
        fc1=nn.Linear(64, 128),
        act1=nn.ReLU(),
        fc2=nn.Linear(128, 64),
        act2=nn.ReLU(),
        out=nn.Linear(64, 10),
    )
    return nn.Sequential(layers).eval()


class CausalLMTask:
    """Batches (inputs (B, T), targets (B, T)) of token ids; a sample's loss is the sum of
    its tokens' next-token cross-entropies (float32)."""

    def to(self, batch, device: torch.device):
        return [v.to(device) for v in batch]

    def per_sample_loss(self, model: nn.Module, batch) -> torch.Tensor:
        """(B,) summed token losses."""
        inputs, targets = batch
        logits = model(inputs)
        targets = targets.reshape(logits.shape[:2])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        return loss.view(targets.shape).sum(1)


def token_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """Random (inputs, targets) token ids, each (batch, seq), targets = inputs shifted."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    return [ids[:, :-1].contiguous(), ids[:, 1:].contiguous()]


def linear_names(model: nn.Module, under: str) -> list[str]:
    """Names of the nn.Linear layers inside `model.<under>` (the transformer blocks)."""
    return [n for n, m in model.named_modules() if n.startswith(under) and isinstance(m, nn.Linear)]
