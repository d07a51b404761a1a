"""Compressors for the per-sample gradient of a Linear layer, from its two factors.

For `y = W x + b` with inputs x_t (B, T, d_in) and output gradients g_t (B, T, d_out), a
sample's weight gradient is G = sum_t g_t a_t^T with a = [x, 1] when the layer has a
bias. Every compressor here maps the factors to (B, k) without forming G, except
`identity`, whose output *is* vec(G) (row-major, bias column last).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from grass_dist.compress.sketch import SJLT, random_mask
from grass_dist.errors import ConfigError
from grass_dist.seeding import generator


@dataclass(frozen=True)
class LinearShape:
    """Shape of a Linear layer's weight gradient: d_out x (d_in + bias)."""

    d_in: int
    d_out: int
    bias: bool

    @property
    def cols(self) -> int:
        return self.d_in + int(self.bias)

    @property
    def numel(self) -> int:
        return self.d_out * self.cols


def _select_inputs(x: torch.Tensor, idx: torch.Tensor, d_in: int) -> torch.Tensor:
    """Columns `idx` of a = [x, 1] without building a: (B, T, d_in) -> (B, T, len(idx))."""
    has_bias_col = bool(idx.numel()) and int(idx[-1]) == d_in  # idx is sorted
    cols = x.index_select(-1, idx[:-1] if has_bias_col else idx)
    if has_bias_col:
        cols = torch.cat([cols, torch.ones_like(x[..., :1])], dim=-1)
    return cols


class LinearCompressor(ABC):
    """Maps (x, g) of one Linear layer to phi (B, out_dim) float32."""

    method: ClassVar[str]

    def __init__(self, name: str, shape: LinearShape):
        self.name = name
        self.shape = shape

    @property
    @abstractmethod
    def out_dim(self) -> int: ...

    @abstractmethod
    def compress(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """x (B, T, d_in), g (B, T, d_out) -> phi (B, out_dim) float32."""

    def spec(self) -> dict[str, Any]:
        """JSON description: part of the index fingerprint."""
        return {
            "method": self.method,
            "d_in": self.shape.d_in,
            "d_out": self.shape.d_out,
            "bias": self.shape.bias,
            "k": self.out_dim,
        }

    def to(self, device: torch.device | str) -> LinearCompressor:
        return self


class IdentityCompressor(LinearCompressor):
    """The exact per-sample gradient vec([dW, db]) (for tests and small models)."""

    method = "identity"

    @property
    def out_dim(self) -> int:
        return self.shape.numel

    def compress(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        a = _select_inputs(x, torch.arange(self.shape.cols, device=x.device), self.shape.d_in)
        grad = torch.bmm(g.transpose(1, 2).float(), a.float())
        return grad.reshape(grad.shape[0], -1)


def factor_sizes(k_prime: int, d_out: int, cols: int) -> tuple[int, int]:
    """Split a mask budget k' into (k_o', k_i') near sqrt(k') each, within the layer."""
    k_o = min(d_out, math.isqrt(k_prime - 1) + 1 if k_prime > 1 else 1)
    k_i = min(cols, -(-k_prime // k_o))
    k_o = min(d_out, -(-k_prime // k_i))
    return k_o, k_i


class FactGraSSCompressor(LinearCompressor):
    """Mask both factors, sum outer products over the sequence, then SJLT to k."""

    method = "factgrass"

    def __init__(
        self,
        name: str,
        shape: LinearShape,
        k: int,
        seed: int,
        blowup: int = 4,
        mask_out: int | None = None,
        mask_in: int | None = None,
        sjlt_c: int = 1,
    ):
        super().__init__(name, shape)
        if mask_out is None or mask_in is None:
            auto_o, auto_i = factor_sizes(blowup * k, shape.d_out, shape.cols)
            mask_out = auto_o if mask_out is None else mask_out
            mask_in = auto_i if mask_in is None else mask_in
        self.idx_out = random_mask(shape.d_out, mask_out, generator(seed, name, "mask_out"))
        self.idx_in = random_mask(shape.cols, mask_in, generator(seed, name, "mask_in"))
        k_prime = self.idx_out.numel() * self.idx_in.numel()
        if k > k_prime:
            raise ConfigError(
                f"compression for layer {name!r}: k={k} exceeds the masked size "
                f"{self.idx_out.numel()}x{self.idx_in.numel()}={k_prime}; lower compression.k "
                f"or raise compression.mask_out/mask_in"
            )
        self.k, self.blowup, self.seed = k, blowup, seed
        self.sjlt = SJLT(k_prime, k, generator(seed, name, "sjlt"), c=sjlt_c)

    @property
    def out_dim(self) -> int:
        return self.k

    def to(self, device: torch.device | str) -> FactGraSSCompressor:
        self.idx_out = self.idx_out.to(device)
        self.idx_in = self.idx_in.to(device)
        self.sjlt.to(device)
        return self

    def compress(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        a = _select_inputs(x, self.idx_in, self.shape.d_in).float()
        g = g.index_select(-1, self.idx_out).float()
        masked = torch.bmm(g.transpose(1, 2), a)  # (B, k_o', k_i')
        return self.sjlt.apply(masked.reshape(masked.shape[0], -1))

    def spec(self) -> dict[str, Any]:
        return {
            **super().spec(),
            "seed": self.seed,
            "blowup": self.blowup,
            "mask_out": self.idx_out.numel(),
            "mask_in": self.idx_in.numel(),
            "sjlt_c": self.sjlt.c,
        }
