"""Exact running top-k per query over a stream of score tiles.

A (score, train row) pair is packed into one int64 key whose integer order is the ranking
order: higher score first and, on equal scores, the lower train row first. So a top-k is one
`torch.topk` over keys, ties never depend on how the rows were tiled or grouped, and the
partial results of any number of scorers merge exactly.

Key layout: the high 32 bits are the float32 score's bits mapped to a signed integer of the
same order; the low 32 bits are `2**32 - 1 - row`. Opponents (lowest scores) are the
proponents of the negated scores (negation is exact).

Per tile, the current k-th best score per query is a threshold: only scores at or above it
can enter, and after the first few tiles they are a small fraction. They are found through
column-group maxima and minima, block by block of queries while the GEMM's output is in
cache (see TopKPair). Those candidates wait in a pool and are merged (one `topk` over
k + pool columns) only when the pool fills, so the merge cost is paid a few times per
stream rather than once per tile.
"""

from __future__ import annotations

import math

import numpy as np
import torch

EMPTY = torch.iinfo(torch.int64).min  # an unfilled slot; sorts below every real key
_LOW = 0xFFFFFFFF
MAX_ROW = _LOW - 1  # row 2**32 - 1 would make a key collide with EMPTY's low bits
_CHUNK = 1 << 21  # elements of int64 keys built at once on the dense path (16 MiB)
GROUP = 8  # columns summarised by one maximum and one minimum in a tile's first pass
_CACHE_FLOATS = 1 << 17  # scores per block of queries (512 KiB), scanned while in cache


def _ordered_bits(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 with the same order (-0.0 folded into +0.0 so equal scores tie)."""
    bits = (values.to(torch.float32) + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def encode(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Scores (...) float32 and train rows (...) int64 (broadcastable) -> keys int64."""
    return (_ordered_bits(values).to(torch.int64) << 32) | (_LOW - rows)


def decode(keys: torch.Tensor, sign: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (...) -> (scores float32, rows int64); empty slots give (-sign * inf, -1)."""
    high = (keys >> 32).to(torch.int32)
    values = (high ^ ((high >> 31) & 0x7FFFFFFF)).view(torch.float32) * sign
    rows = _LOW - (keys & _LOW)
    empty = keys == EMPTY
    values = values.masked_fill(empty, -sign * float("inf"))
    return values, rows.masked_fill(empty, -1)


def merge_keys(a: torch.Tensor, b: torch.Tensor, k: int, ordered: bool = True) -> torch.Tensor:
    """Best k of two key sets (Q, m) and (Q, n) -> (Q, k), best first if `ordered`."""
    both = torch.cat([a, b], dim=1)
    if both.shape[1] < k:
        pad = torch.full((both.shape[0], k - both.shape[1]), EMPTY, dtype=torch.int64)
        both = torch.cat([both, pad], dim=1)
    return torch.topk(both, k, dim=1, sorted=ordered).values


class RunningTopK:
    """Best `k` (score, row) pairs per query of everything added; `sign` -1 keeps the lowest.

    Scores arrive already filtered by `threshold()` (see TopKPair); the kept keys are an
    unordered set until `finish()`. Keys and the candidate pool share one int64 buffer
    (Q, k + max(k, 128)), so merging the pool is a `topk` in place of any concatenation.
    """

    def __init__(self, n_query: int, k: int, sign: int = 1):
        if sign not in (1, -1):
            raise ValueError(f"sign must be 1 (proponents) or -1 (opponents), got {sign}")
        self.k, self.sign = k, sign
        self._buf = torch.full((n_query, k + max(k, 128)), EMPTY, dtype=torch.int64)
        self.fill = torch.zeros(n_query, dtype=torch.int64)
        self.kth = torch.full((n_query,), EMPTY, dtype=torch.int64)

    @property
    def keys(self) -> torch.Tensor:
        """(Q, k) kept keys (a view; unordered until finish)."""
        return self._buf[:, : self.k]

    @property
    def pool(self) -> torch.Tensor:
        return self._buf[:, self.k :]

    def threshold(self) -> torch.Tensor:
        """(Q, 1) float32: the k-th best score merged so far in sign-adjusted units (-inf while
        unfilled); any score that can still enter is at or above it."""
        return decode(self.kth[:, None], 1)[0]

    def add_dense(self, scores: torch.Tensor, rows: torch.Tensor, start: int = 0) -> None:
        """Every score of queries start.. (scores (q, T), rows (T,)), in chunks of queries."""
        self._flush()
        step = max(1, _CHUNK // max(1, scores.shape[1]))
        for lo in range(0, scores.shape[0], step):
            part = encode(scores[lo : lo + step] * self.sign, rows)
            a, b = start + lo, start + lo + part.shape[0]
            self._buf[a:b, : self.k] = merge_keys(self.keys[a:b], part, self.k, False)
            self.kth[a:b] = self.keys[a:b].amin(dim=1)

    def add_candidates(self, qi: torch.Tensor, keys: torch.Tensor) -> None:
        """Candidates as (query index (n,) ascending, key (n,)) into the pool."""
        n_query, cap = self.pool.shape
        counts = torch.bincount(qi, minlength=n_query)
        if int((self.fill + counts).max()) > cap:
            self._flush()
            keep = keys > self.kth[qi]  # keys are unique, so strictly better only
            qi, keys = qi[keep], keys[keep]
            counts = torch.bincount(qi, minlength=n_query)
            if int(counts.max()) > cap:
                merged = merge_keys(self.keys, _padded(qi, keys, counts), self.k, False)
                self._buf[:, : self.k] = merged
                self.kth = merged.amin(dim=1)
                return
        starts = torch.cumsum(counts, 0) - counts
        pos = (self.fill - starts).index_select(0, qi) + torch.arange(qi.numel())
        width = self._buf.shape[1]
        self._buf.view(-1).index_copy_(0, qi * width + self.k + pos, keys)
        self.fill += counts

    def finish(self) -> torch.Tensor:
        """Keys (Q, k), best first, after merging every waiting candidate (an unordered
        `topk`, then numpy's sort, several times faster than torch's on int64 rows)."""
        width = int(self.fill.max())
        keys = self.keys
        if width > 0:
            keys = torch.topk(self._buf[:, : self.k + width], self.k, dim=1, sorted=False).values
        flipped = np.invert(keys.numpy())  # ~key reverses the order exactly (no overflow)
        flipped.sort(axis=1)
        out = torch.from_numpy(np.invert(flipped, out=flipped))
        self._buf[:, : self.k] = out
        self._buf[:, self.k : self.k + width] = EMPTY
        self.fill.zero_()
        self.kth = out[:, -1].clone()
        return out

    def _flush(self) -> None:
        width = int(self.fill.max())
        if width > 0:
            merged = torch.topk(self._buf[:, : self.k + width], self.k, dim=1, sorted=False)
            self._buf[:, : self.k] = merged.values
            self.kth = merged.values.amin(dim=1)
            del merged
            self._buf[:, self.k : self.k + width] = EMPTY
            self.fill.zero_()


class TopKPair:
    """Proponents (highest scores) and opponents (lowest) of a stream of (Q, T) tiles.

    A tile is filtered block by block of queries, each block while it is still in cache
    (`scan`, called by the scorer right after a block of the GEMM): the block's columns are
    split into `GROUP` interleaved groups {w, w + W, ...} and each query's maximum and
    minimum over every group taken (vectorised reductions, far cheaper per score than a
    compare that writes a mask). Only groups whose extremum reaches a side's threshold are
    opened and their scores compared one by one; at the thresholds a top-k reaches, most
    groups stay closed. `add` then moves the tile's candidates into the running lists.

    With `expected_rows` (the stream's length) the first tile also sets a floor per query:
    the score that about 1.5-2 k of all rows are expected to reach, read off the top ranks
    of the tile's group extrema (the r-th best group extremum is at most the r-th best
    score, so the floor errs low). Scores below the floor are dropped from the start, which
    skips the warm-up in which most scores would qualify. A query whose k-th best ends
    below its floor is reported by `shortfall()` and must be rescored without one.
    """

    def __init__(self, n_query: int, k: int, expected_rows: int | None = None):
        self.k = k
        self.n_query = n_query
        self.props = RunningTopK(n_query, k, 1)
        self.opps = RunningTopK(n_query, k, -1)
        self.expected_rows = expected_rows
        self.floor: tuple[torch.Tensor, torch.Tensor] | None = None
        self._started = False
        self._scan: _TileScan | None = None

    def scan(self, block: torch.Tensor, start: int) -> None:
        """Queries start.. (q of them) of the tile being scored: block (q, T) float32,
        contiguous. Call for every block in order of `start`, then `add` the whole tile."""
        if start == 0:
            self._scan = _TileScan(block.shape[1], self._bounds())
        scan = self._scan
        if scan is None or start != scan.covered:
            raise ValueError(
                f"scan blocks must cover the tile's queries in order from 0, got {start}"
            )
        high, low = _group_extrema(block)
        scan.covered += block.shape[0]
        if not self._started:  # the floor needs the whole first tile's extrema first
            scan.extrema.append((high, low))
            return
        flat_block = block.numpy().reshape(-1)
        for side, extrema in enumerate((high, low)):
            scan.collect(side, flat_block, extrema.numpy(), start)

    def add(self, scores: torch.Tensor, rows: torch.Tensor) -> None:
        """Fold a tile: scores (Q, T) float32 (contiguous), rows (T,) int64; its blocks were
        passed to `scan` before (if not, the tile is scanned here)."""
        if scores.shape[0] == 0:
            return
        scan = self._scan
        if scan is None or scan.covered != scores.shape[0] or scan.n_cols != scores.shape[1]:
            self._scan_tile(scores)
            scan = self._scan
        if not self._started:
            self._started = True
            high = torch.cat([h for h, _ in scan.extrema])
            low = torch.cat([lo for _, lo in scan.extrema])
            self.floor = self._estimate_floor(scores.shape[1], high, low)
            self._scan_tile(scores)
            scan = self._scan
        self._scan = None
        width = scores.shape[1] // GROUP
        flat_scores = scores.numpy().reshape(-1)
        for side, top in enumerate((self.props, self.opps)):
            if scan.dense[side]:  # warm-up: most groups qualify, select from the whole tile
                top.add_dense(scores, rows)
                continue
            flats = scan.runs(side)
            if scores.shape[1] > GROUP * width:  # columns past the last whole group
                flats.append(scan.ungrouped(side, scores.numpy(), GROUP * width))
            for flat in flats:
                _add_flat(top, scores.shape[1], flat_scores, rows, flat)

    def _scan_tile(self, scores: torch.Tensor) -> None:
        step = query_block(scores.shape[1])
        for lo in range(0, scores.shape[0], step):
            self.scan(scores[lo : lo + step], lo)

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(Q, 1) float32 thresholds: a proponent must reach hi, an opponent lo."""
        hi, lo = self.props.threshold(), -self.opps.threshold()
        if self.floor is not None:
            hi, lo = torch.maximum(hi, self.floor[0]), torch.minimum(lo, self.floor[1])
        return hi.numpy(), lo.numpy()

    def _estimate_floor(
        self, n_tile: int, high: torch.Tensor, low: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-query (high, low) floors from the first tile's group extrema, or None when
        not worth it."""
        if self.expected_rows is None:
            return None
        expected = self.k * n_tile / self.expected_rows  # rank of the final k-th in this tile
        rank = math.ceil(expected + 4.0 * math.sqrt(expected) + 8.0)
        if rank > high.shape[1] // 4:
            return None
        hi = torch.topk(high, rank, dim=1, sorted=False).values.amin(1, keepdim=True)
        lo = torch.topk(low, rank, dim=1, largest=False, sorted=False).values.amax(1, True)
        return hi, lo

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(proponent keys, opponent keys), each (Q, k) best first."""
        return self.props.finish(), self.opps.finish()

    def shortfall(self) -> torch.Tensor:
        """Indices of queries whose floor dropped rows they needed (call after finish): their
        k-th best is below the floor (or missing), so a row under the floor may belong."""
        if self.floor is None:
            return torch.zeros(0, dtype=torch.int64)
        hi, lo = self.floor
        short = (decode(self.props.kth[:, None])[0] < hi) | (
            decode(self.opps.kth[:, None])[0] < -lo
        )
        return short.flatten().nonzero().flatten()


class _TileScan:
    """What `TopKPair.scan` gathered of one tile: per side (0 proponents, 1 opponents) and
    block, the flat indices of its candidates as `GROUP` ascending runs (one per group
    member) with their lengths, or `dense` when most groups were open."""

    def __init__(self, n_cols: int, bounds: tuple[np.ndarray, np.ndarray]):
        self.n_cols, self.bounds = n_cols, bounds
        self.covered = 0
        self.extrema: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.dense = [False, False]
        self.parts: tuple[list, list] = ([], [])

    def collect(self, side: int, flat_block: np.ndarray, extrema: np.ndarray, start: int) -> None:
        """Candidates of one block (queries start..) whose group extrema are `extrema`."""
        if self.dense[side]:
            return
        compare = _COMPARE[side]
        n_block, width = extrema.shape
        bound = self.bounds[side][start : start + n_block]
        hit = np.flatnonzero(compare(extrema, bound))
        if hit.size > extrema.size // 2:
            self.dense[side] = True
            return
        offset = start * self.n_cols
        qi = hit // width
        first = hit + qi * (self.n_cols - width)  # the group's first column, flat in the block
        flat = first + np.arange(GROUP)[:, None] * width  # (GROUP, hits)
        keep = compare(flat_block[flat], bound.reshape(-1)[qi])
        self.parts[side].append((flat[keep] + offset, keep.sum(1)))

    def runs(self, side: int) -> list[np.ndarray]:
        """The side's candidates as `GROUP` arrays of flat indices, each ascending."""
        pieces = [np.split(flat, np.cumsum(counts)[:-1]) for flat, counts in self.parts[side]]
        return [np.concatenate([p[m] for p in pieces]) for m in range(GROUP)] if pieces else []

    def ungrouped(self, side: int, scores: np.ndarray, start: int) -> np.ndarray:
        """Flat indices into `scores` (Q, T) of columns start.. that pass, compared plainly."""
        qi, col = np.nonzero(_COMPARE[side](scores[:, start:], self.bounds[side]))
        return qi * scores.shape[1] + start + col


_COMPARE = (np.greater_equal, np.less_equal)  # a candidate's test against its side's bound


def _add_flat(side: RunningTopK, n_cols: int, flat_scores, rows, flat: np.ndarray) -> None:
    """Candidates given as flat indices (grouped by query) into the (Q, n_cols) scores into
    `side`'s pool."""
    flat = torch.from_numpy(flat)
    qi = torch.div(flat, n_cols, rounding_mode="floor")
    values = torch.from_numpy(flat_scores).index_select(0, flat)
    cand_rows = rows.index_select(0, flat - qi * n_cols)
    side.add_candidates(qi, encode(values * side.sign, cand_rows))


def query_block(n_cols: int) -> int:
    """Queries per block of a (Q, n_cols) float32 tile such that a block stays in cache."""
    return max(1, _CACHE_FLOATS // max(1, n_cols))


def _group_extrema(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query of a block (q, T), the max and min (q, W) over each group of columns
    {w, w + W, ..., w + (GROUP - 1) W}, W = T // GROUP: reductions over a middle axis,
    which torch vectorises along the contiguous one."""
    width = block.shape[1] // GROUP
    if width == 0:
        return torch.empty(block.shape[0], 0), torch.empty(block.shape[0], 0)
    part = block[:, : GROUP * width].view(-1, GROUP, width)
    return part.amax(1), part.amin(1)


def _padded(qi: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Ragged per-query keys (qi ascending) -> (Q, max count) padded with EMPTY."""
    out = torch.full((counts.numel(), int(counts.max())), EMPTY, dtype=torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    out[qi, torch.arange(qi.numel()) - starts[qi]] = keys
    return out
