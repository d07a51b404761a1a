"""Which scores of a tile can enter a running top-k: the candidate filter of
`topk.TopKPair`.

A tile (Q, T) of scores is scanned block by block of queries while the GEMM's output is in
cache (`query_block`). Per side (0 proponents, 1 opponents) a score is a candidate when it
reaches its query's bound (at least the bound for proponents, at most for opponents). Two
filters find them: `group`, through each query's maximum and minimum over `GROUP`
interleaved column groups (`group_extrema`), opening only the groups whose extremum reaches
the bound; and `mask`, one compare per score, cheaper once a few percent of the scores
qualify (`MASK_PASS_RATE`). Either returns nothing when most scores qualify: the side is
then `dense` for the tile, and the top-k selects from the whole tile.
"""

from __future__ import annotations

import numpy as np
import torch

GROUP = 8  # columns summarised by one maximum and one minimum (the group filter)
_CACHE_FLOATS = 1 << 17  # scores per block of queries (512 KiB), scanned while in cache
MASK_PASS_RATE = 0.005  # share of candidates above which a plain compare beats the groups


class TileScan:
    """What `topk.TopKPair.scan` gathered of one tile: per side (0 proponents, 1 opponents) and
    block, its candidates as (flat indices into the tile, scores), grouped by query, or
    `dense` when most scores qualified. `masked[side]` picks the side's filter."""

    def __init__(self, n_cols: int, bounds: tuple[np.ndarray, np.ndarray], masked: list[bool]):
        self.n_cols, self.bounds, self.masked = n_cols, bounds, masked
        self.covered = 0
        self.extrema: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.dense = [False, False]
        self.parts: tuple[list, list] = ([], [])
        self._mask = np.empty(0, dtype=bool)

    def collect(self, block: np.ndarray) -> None:
        """Candidates of the block (q, T) of queries that `covered` ends with."""
        start = self.covered - block.shape[0]
        if self.masked[0] and self.masked[1]:
            extrema = (None, None)
        else:
            extrema = tuple(e.numpy() for e in group_extrema(torch.from_numpy(block)))
        for side in (0, 1):
            if self.dense[side]:
                continue
            bound = self.bounds[side][start : self.covered]
            if self.masked[side]:
                found = self._compare_all(side, block, bound)
            else:
                found = _open_groups(side, block, extrema[side], bound)
            if found is None:
                self.dense[side] = True
            else:
                self.parts[side].append((found[0] + start * self.n_cols, found[1]))

    def _compare_all(self, side: int, block: np.ndarray, bound: np.ndarray):
        """(flat indices, scores) of the block's scores that reach `bound`, None if most do."""
        if self._mask.size < block.size:
            self._mask = np.empty(block.size, dtype=bool)
        mask = self._mask[: block.size].reshape(block.shape)
        flat = np.flatnonzero(_COMPARE[side](block, bound, out=mask))
        if flat.size > block.size // 2:
            return None
        return flat, block.reshape(-1)[flat]

    def runs(self, side: int, scores: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """The side's candidates as (flat indices into `scores` (Q, T), scores) runs, each
        grouped by query: the blocks' candidates, then (group filter) any columns past the
        last whole group, compared plainly."""
        parts = self.parts[side]
        out = []
        if parts:
            out.append(
                (np.concatenate([f for f, _ in parts]), np.concatenate([v for _, v in parts]))
            )
        edge = GROUP * (self.n_cols // GROUP)
        if not self.masked[side] and edge < self.n_cols:
            qi, col = np.nonzero(_COMPARE[side](scores[:, edge:], self.bounds[side]))
            flat = qi * self.n_cols + edge + col
            out.append((flat, scores.reshape(-1)[flat]))
        return out


_COMPARE = (np.greater_equal, np.less_equal)  # a candidate's test against its side's bound


def _open_groups(side: int, block: np.ndarray, extrema: np.ndarray, bound: np.ndarray):
    """(flat indices, scores) of the block's (q, T) whole-group scores that reach `bound`
    (q, 1), found through the groups' extrema (q, W); None if most groups qualify."""
    compare = _COMPARE[side]
    n_block, width = extrema.shape
    hit = np.flatnonzero(compare(extrema, bound))
    if hit.size > extrema.size // 2:
        return None
    qi = hit // width
    first = hit + qi * (block.shape[1] - width)  # the group's first column, flat in the block
    flat = first[:, None] + np.arange(GROUP) * width  # (hits, GROUP): grouped by query
    values = block.reshape(-1)[flat]
    keep = compare(values, bound.reshape(-1)[qi][:, None])
    return flat[keep], values[keep]


def query_block(n_cols: int) -> int:
    """Queries per block of a (Q, n_cols) float32 tile such that a block stays in cache."""
    return max(1, _CACHE_FLOATS // max(1, n_cols))


def group_extrema(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query of a block (q, T), the max and min (q, W) over each group of columns
    {w, w + W, ..., w + (GROUP - 1) W}, W = T // GROUP: reductions over a middle axis,
    which torch vectorises along the contiguous one."""
    width = block.shape[1] // GROUP
    if width == 0:
        return torch.empty(block.shape[0], 0), torch.empty(block.shape[0], 0)
    part = block[:, : GROUP * width].view(-1, GROUP, width)
    return part.amax(1), part.amin(1)
