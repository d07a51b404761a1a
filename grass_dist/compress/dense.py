"""Dense Johnson-Lindenstrauss projections (TRAK's baseline): y = vec(G) R / sqrt(k).

R (p, k) is defined block by block: rows [b * BLOCK_ROWS, (b + 1) * BLOCK_ROWS) come from
the generator of (seed, layer, method, b). So R is the same however many rows are
generated at a time (`chunk_rows` bounds memory only) and on every device. It costs
O(p k) time per sample -- the cost GraSS avoids.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from grass_dist.compress.base import Compressor, LayerShape, check_k
from grass_dist.runtime.seeding import generator

BLOCK_ROWS = 1024


class DenseJL(Compressor):
    """y = v R / sqrt(k) with R drawn from `draw`; R is kept on the device if small enough."""

    draw: ClassVar[str]

    def __init__(
        self,
        name: str,
        shape: LayerShape,
        k: int,
        seed: int,
        chunk_rows: int = 4 * BLOCK_ROWS,
        cache_bytes: int = 256 << 20,
    ):
        super().__init__(name, shape)
        self.k, self.seed = k, seed
        self.blocks_per_chunk = max(1, -(-chunk_rows // BLOCK_ROWS))
        self.device = torch.device("cpu")
        self.cached = shape.numel * k * 4 <= cache_bytes
        self._r: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg: Any, name: str, shape: LayerShape) -> DenseJL:
        check_k(cfg.k, name, shape)
        return cls(name, shape, cfg.k, cfg.seed, cfg.jl_chunk_rows, cfg.jl_cache_mb << 20)

    @property
    def out_dim(self) -> int:
        return self.k

    def _block(self, b: int) -> torch.Tensor:
        rows = min(BLOCK_ROWS, self.shape.numel - b * BLOCK_ROWS)
        gen = generator(self.seed, self.name, self.method, str(b))
        if self.draw == "gaussian":
            return torch.randn(rows, self.k, generator=gen)
        return torch.randint(0, 2, (rows, self.k), generator=gen).float() * 2 - 1

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, R rows) in chunks of `blocks_per_chunk` blocks, on the device."""
        n_blocks = -(-self.shape.numel // BLOCK_ROWS)
        for b0 in range(0, n_blocks, self.blocks_per_chunk):
            blocks = [self._block(b) for b in range(b0, min(n_blocks, b0 + self.blocks_per_chunk))]
            yield b0 * BLOCK_ROWS, torch.cat(blocks).to(self.device)

    def matrix(self) -> torch.Tensor:
        """The explicit (p, k) matrix R (without the 1/sqrt(k)); for tests on small sizes."""
        return torch.cat([r.cpu() for _, r in self.chunks()])

    def to(self, device: torch.device | str) -> DenseJL:
        self.device = torch.device(device)
        self._r = None
        return self

    def compress_flat(self, v: torch.Tensor) -> torch.Tensor:
        v = v.float()
        if self.cached:
            if self._r is None:
                self._r = self.matrix().to(self.device)
            return v @ self._r / math.sqrt(self.k)
        out = torch.zeros(v.shape[0], self.k, dtype=torch.float32, device=v.device)
        for lo, r in self.chunks():
            out += v[:, lo : lo + r.shape[0]] @ r
        return out / math.sqrt(self.k)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "seed": self.seed, "block_rows": BLOCK_ROWS}


class GaussianJL(DenseJL):
    """R with N(0, 1) entries."""

    method = "gaussian"
    draw = "gaussian"


class RademacherJL(DenseJL):
    """R with +-1 entries."""

    method = "rademacher"
    draw = "rademacher"
