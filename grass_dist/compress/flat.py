"""Flat compressors: act on a layer's whole per-sample gradient vector v = vec(G) (B, p).

`random_mask` keeps k coordinates (no rescaling), `sjlt` sketches all p coordinates, and
`grass` masks k' = blowup * k coordinates and then sketches them to k. For a Linear
layer the masked entries are read straight from the factors (O(T k'), G never formed).
"""

from __future__ import annotations

from typing import Any

import torch

from grass_dist.compress.base import (
    Compressor,
    LayerShape,
    check_k,
    linear_entries,
    linear_gradient,
)
from grass_dist.compress.sketch import SJLT, random_mask
from grass_dist.runtime.seeding import generator


class MaskSketch(Compressor):
    """phi = SJLT(v[idx]) (or v[idx] without a sketch); idx None keeps every coordinate."""

    def __init__(
        self,
        name: str,
        shape: LayerShape,
        seed: int,
        idx: torch.Tensor | None,
        k: int | None,
        sjlt_c: int = 1,
    ):
        super().__init__(name, shape)
        self.seed, self.idx = seed, idx
        kept = shape.numel if idx is None else idx.numel()
        self.sjlt = SJLT(kept, k, generator(seed, name, "sjlt"), c=sjlt_c) if k else None
        self.kept = kept

    @property
    def out_dim(self) -> int:
        return self.sjlt.k if self.sjlt is not None else self.kept

    def to(self, device: torch.device | str) -> MaskSketch:
        if self.idx is not None:
            self.idx = self.idx.to(device)
        if self.sjlt is not None:
            self.sjlt.to(device)
        return self

    def _finish(self, masked: torch.Tensor) -> torch.Tensor:
        return self.sjlt.apply(masked) if self.sjlt is not None else masked.float()

    def compress(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.idx is None:
            return self._finish(linear_gradient(x, g, self.shape))
        return self._finish(linear_entries(x, g, self.shape, self.idx))

    def compress_flat(self, v: torch.Tensor) -> torch.Tensor:
        return self._finish(v if self.idx is None else v.index_select(1, self.idx))

    def spec(self) -> dict[str, Any]:
        out = {**super().spec(), "seed": self.seed, "mask": self.kept}
        if self.sjlt is not None:
            out["sjlt_c"] = self.sjlt.c
        return out


class RandomMaskCompressor(MaskSketch):
    """RM(k): k random coordinates of vec(G), no rescaling."""

    method = "random_mask"

    @classmethod
    def from_config(cls, cfg: Any, name: str, shape: LayerShape) -> RandomMaskCompressor:
        check_k(cfg.k, name, shape)
        idx = random_mask(shape.numel, cfg.k, generator(cfg.seed, name, "mask"))
        return cls(name, shape, cfg.seed, idx, None)


class SJLTCompressor(MaskSketch):
    """SJLT(p -> k) of the whole vec(G); O(c p) per sample."""

    method = "sjlt"

    @classmethod
    def from_config(cls, cfg: Any, name: str, shape: LayerShape) -> SJLTCompressor:
        check_k(cfg.k, name, shape)
        return cls(name, shape, cfg.seed, None, cfg.k, cfg.sjlt_c)


class GraSSCompressor(MaskSketch):
    """GraSS: RM(k' = blowup * k) then SJLT(k' -> k); O(k') per sample."""

    method = "grass"

    def __init__(
        self,
        name: str,
        shape: LayerShape,
        seed: int,
        idx: torch.Tensor,
        k: int,
        sjlt_c: int = 1,
        blowup: int = 4,
    ):
        super().__init__(name, shape, seed, idx, k, sjlt_c)
        self.blowup = blowup

    @classmethod
    def from_config(cls, cfg: Any, name: str, shape: LayerShape) -> GraSSCompressor:
        check_k(cfg.k, name, shape)
        idx = random_mask(shape.numel, cfg.blowup * cfg.k, generator(cfg.seed, name, "mask"))
        return cls(name, shape, cfg.seed, idx, cfg.k, cfg.sjlt_c, cfg.blowup)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "blowup": self.blowup}
