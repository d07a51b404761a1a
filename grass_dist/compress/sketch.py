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


def scatter_signed(
    out: torch.Tensor,
    x: torch.Tensor,
    buckets: torch.Tensor,
    signs: torch.Tensor,
    overwrite: bool = False,
) -> None:
    """out[:, buckets[r, j]] += signs[r, j] x[:, j] for every r, then j.

    out (B, k) and x (B, d) float32; buckets (c, d) long; signs (c, d) float32. With
    `overwrite`, x may be scaled in place (saves a (B, d) temporary). On the CPU each output
    entry sums its terms in (r, j) order whatever B is, so results do not depend on the
    batch size.
    """
    c = buckets.shape[0]
    for r in range(c):
        src = x.mul_(signs[r]) if overwrite and r == c - 1 else x * signs[r]
        # Adding along each sample's row needs no transposed (d, B) copies: measured ~4x
        # faster than adding rows of one at batch 8 x 16384 columns, and no slower at 256.
        out.index_add_(1, buckets[r], src)


class SJLT:
    """y[h(j, r)] += s(j, r) x[j] / sqrt(c) for every input coordinate j and r < c.

    `apply` maps (B, d) to (B, k). With c = 1, E||y||^2 = ||x||^2 (no 1/sqrt(k)).
    `buckets` and `signs` are (c, d): row r holds h(., r) and s(., r) / sqrt(c).
    """

    def __init__(self, d: int, k: int, gen: torch.Generator, c: int = 1):
        if d <= 0 or k <= 0 or c <= 0:
            raise ValueError(f"SJLT needs positive d, k, c (got d={d}, k={k}, c={c})")
        self.d, self.k, self.c = d, k, c
        self.buckets = torch.randint(0, k, (c * d,), generator=gen).view(c, d)
        signs = torch.randint(0, 2, (c * d,), generator=gen).to(torch.float32) * 2 - 1
        self.signs = (signs / math.sqrt(c)).view(c, d)

    def to(self, device: torch.device | str) -> SJLT:
        self.buckets = self.buckets.to(device)
        self.signs = self.signs.to(device)
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) float -> (B, k) float32."""
        x = x.to(torch.float32)
        out = torch.zeros(x.shape[0], self.k, dtype=torch.float32, device=x.device)
        scatter_signed(out, x, self.buckets, self.signs)
        return out

    def matrix(self) -> torch.Tensor:
        """The explicit (d, k) matrix S with y = x S (for tests on small sizes)."""
        s = torch.zeros(self.c, self.d, self.k)
        rows = torch.arange(self.d)
        for r in range(self.c):
            s[r, rows, self.buckets[r].cpu()] = self.signs[r].cpu()
        return s.sum(0)
