"""Random masks and the sparse Johnson-Lindenstrauss transform (SJLT).

Both are fixed by a CPU generator, so identical in every process and on every device.
"""

from __future__ import annotations

import math

import torch


def random_mask(dim: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted indices of `size` coordinates out of `dim` (all of them if size >= dim)."""
    if size >= dim:
        return torch.arange(dim, dtype=torch.long)
    return torch.sort(torch.randperm(dim, generator=gen)[:size]).values


class SJLT:
    """y[h(j, r)] += s(j, r) x[j] / sqrt(c) for every input coordinate j and r < c.

    `apply` maps (B, d) to (B, k). With c = 1, E||y||^2 = ||x||^2 (no 1/sqrt(k)).
    """

    def __init__(self, d: int, k: int, gen: torch.Generator, c: int = 1):
        if d <= 0 or k <= 0 or c <= 0:
            raise ValueError(f"SJLT needs positive d, k, c (got d={d}, k={k}, c={c})")
        self.d, self.k, self.c = d, k, c
        self.buckets = torch.randint(0, k, (c * d,), generator=gen)
        signs = torch.randint(0, 2, (c * d,), generator=gen).to(torch.float32) * 2 - 1
        self.signs = signs / math.sqrt(c)

    def to(self, device: torch.device | str) -> SJLT:
        self.buckets = self.buckets.to(device)
        self.signs = self.signs.to(device)
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) float -> (B, k) float32."""
        x = x.to(torch.float32)
        if self.c > 1:
            x = x.repeat(1, self.c)
        # Accumulating rows of the transposed input keeps each add contiguous in B.
        src = (x * self.signs).t().contiguous()
        out = torch.zeros(self.k, x.shape[0], dtype=torch.float32, device=x.device)
        out.index_add_(0, self.buckets, src)
        return out.t().contiguous()

    def matrix(self) -> torch.Tensor:
        """The explicit (d, k) matrix S with y = x S (for tests on small sizes)."""
        s = torch.zeros(self.c * self.d, self.k)
        s[torch.arange(self.c * self.d), self.buckets.cpu()] = self.signs.cpu()
        return s.view(self.c, self.d, self.k).sum(0)
