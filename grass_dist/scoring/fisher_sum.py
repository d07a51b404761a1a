"""The per-layer Fisher sums of the compressed gradients, summed over any split of rows.

H_l = (1/n) sum_i phi_il phi_il^T is a sum over rows, so it map-reduces over shards: each
block of rows is float64 GEMMs over the upper triangle only, summed across blocks and
shards and mirrored once at the end (about half the cost of the full product). The rows
are float32, so every product is exact in float64 and only the sums round, at 1e-16.
float32 sums would not do: their rounding (about 1e-7 of |H|) falls also on directions
where H is zero (a layer with fewer rows than dimensions, or a softmax output layer, whose
gradients sum to zero over the classes), and a small damping divides it by lambda: at
delta = 1e-4 influence was 2 % off the exact value. Its factorisations and file format are
`grass_dist.scoring.precondition`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from grass_dist.scoring.packing import mirror_upper, symmetric_

_GRAM_ROWS = 1024  # rows per GEMM of the Fisher sum (small pieces still make large GEMMs)
_GRAM_COLS = 512  # columns per strip of the Fisher sum's upper triangle
EMPTY_INDEX = "cannot build a preconditioner from an empty index"


def gram(x: np.ndarray) -> np.ndarray:
    """x^T x (k, k) float64 of x (n, k), exact on and above the diagonal only (the lower
    triangle is partial: read it through `mirror_upper`).

    float64 GEMMs over blocks of _GRAM_ROWS rows, summed; each multiplies a strip
    of _GRAM_COLS columns by the columns from that strip on, so about (1 + _GRAM_COLS / k) / 2
    of the flops of the full product.
    """
    g = RunningGram(x.shape[1])
    g.add(x)
    return g.result()


class RunningGram:
    """`gram` of rows that arrive in pieces of any size (e.g. one shard at a time).

    Rows wait in one float64 buffer of _GRAM_ROWS rows and go through the GEMMs a full buffer
    at a time, so the sums are those of `gram` of all the rows concatenated, bit for bit,
    however they were split; and small pieces (128-row shards) still make large GEMMs, with
    one float64 addition per _GRAM_ROWS rows instead of one per piece.
    """

    def __init__(self, k: int):
        self.total = torch.zeros(k, k, dtype=torch.float64)
        self._rows = torch.empty(_GRAM_ROWS, k, dtype=torch.float64)
        self._fill = 0

    def add(self, x: np.ndarray) -> None:
        rows = self._rows.numpy()  # a view: copying into it converts to float64 on the way
        lo = 0
        while lo < x.shape[0]:
            take = min(_GRAM_ROWS - self._fill, x.shape[0] - lo)
            rows[self._fill : self._fill + take] = x[lo : lo + take]
            self._fill, lo = self._fill + take, lo + take
            if self._fill == _GRAM_ROWS:
                self._flush()

    def result(self) -> np.ndarray:
        """The (k, k) float64 sums of every row added (upper triangle exact)."""
        self._flush()
        return self.total.numpy()

    def _flush(self) -> None:
        block = self._rows[: self._fill]
        for a in range(0, block.shape[1], _GRAM_COLS):
            self.total[a : a + _GRAM_COLS, a:] += block[:, a : a + _GRAM_COLS].T @ block[:, a:]
        self._fill = 0


@dataclass
class FisherSum:
    """Unnormalised sums phi^T phi per layer ((k, k) float64) over `n` rows; only entries on
    and above the diagonal count (see `gram`), `matrix` gives the symmetric whole."""

    sums: dict[str, np.ndarray]
    n: int

    @classmethod
    def of(cls, phi: dict[str, np.ndarray]) -> FisherSum:
        return cls.accumulate([phi])

    @classmethod
    def accumulate(cls, blocks: Iterable[dict[str, np.ndarray]]) -> FisherSum:
        """The sum over blocks of rows (e.g. the shards of one map task): per layer one
        `RunningGram`, so the same sums as `of` the blocks concatenated, bit for bit, with
        one (k, k) float64 buffer per layer (134 MB at k=4096) and large GEMMs however
        small the blocks.
        """
        grams: dict[str, RunningGram] = {}
        n = 0
        for phi in blocks:
            for name, x in phi.items():
                if name not in grams:
                    grams[name] = RunningGram(x.shape[1])
                grams[name].add(x)
            n += next(iter(phi.values())).shape[0] if phi else 0
        return cls({name: g.result() for name, g in grams.items()}, n)

    def matrix(self, name: str) -> np.ndarray:
        """Layer `name`'s symmetric (k, k) sum."""
        return mirror_upper(self.sums[name])

    def __add__(self, other: FisherSum) -> FisherSum:
        if not self.sums:
            return other
        if not other.sums:
            return self
        return FisherSum({k: v + other.sums[k] for k, v in self.sums.items()}, self.n + other.n)


def fisher_matrix(parts: Sequence[np.ndarray], n: int) -> torch.Tensor:
    """H = (sum of `parts`) / n, symmetric (k, k) float64, from one layer's partial sums over
    disjoint rows (each exact on and above the diagonal, as `gram` leaves them), added in
    the order given: the same bits as `Preconditioner.from_fisher` of their `FisherSum`s
    added in that order."""
    if n == 0 or not parts:
        raise ValueError(EMPTY_INDEX)
    # A new array (the parts may be read-only): the first sum, or a copy of a lone part.
    if len(parts) == 1:
        total = np.array(parts[0], dtype=np.float64)
    else:
        total = np.add(parts[0], parts[1], dtype=np.float64)
    for part in parts[2:]:
        np.add(total, part, out=total)
    return symmetric_(torch.from_numpy(total)).div_(n)
