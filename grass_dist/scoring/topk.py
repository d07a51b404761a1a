"""Exact running top-k per query over a stream of score tiles.

A (score, train row) pair is packed into one int64 key whose integer order is the ranking
order: higher score first and, on equal scores, the lower train row first. So a top-k is one
`torch.topk` over keys, ties never depend on how the rows were tiled or grouped, and the
partial results of any number of scorers merge exactly.

Key layout: the high 32 bits are the float32 score's bits mapped to a signed integer of the
same order; the low 32 bits are `2**32 - 1 - row`. Opponents (lowest scores) are the
proponents of the negated scores (negation is exact).

Per tile, the current k-th best score per query (or a floor estimated from the rows seen)
is a threshold: only scores at or above it can enter, and after the first few tiles they
are a small fraction. They are found block by block of queries while the GEMM's output is
in cache, through column-group maxima and minima when very few qualify and through one
compare per score otherwise (see TopKPair). Each query's candidates are appended to its
row of one buffer, merged down to k (one `topk`) only when the row fills, so a stream pays
for about one selection per query rather than one per tile.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from grass_dist.scoring.tile_filter import MASK_PASS_RATE, TileScan, group_extrema, query_block

EMPTY = torch.iinfo(torch.int64).min  # an unfilled slot; sorts below every real key
_LOW = 0xFFFFFFFF
MAX_ROW = _LOW - 1  # row 2**32 - 1 would make a key collide with EMPTY's low bits
_CHUNK = 1 << 21  # elements of int64 keys built at once on the dense path (16 MiB)


def _pack(scores: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Keys from float32 scores (with -0.0 already folded into +0.0, so equal scores tie)
    and their low words `_LOW - row`: the float's bits mapped to an int32 of the same order
    go to the high word."""
    bits = scores.view(torch.int32)
    return ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) << 32) | low


def encode(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Scores (...) float32 and train rows (...) int64 (broadcastable) -> keys int64."""
    return _pack(values.to(torch.float32) + 0.0, _LOW - rows)


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

    Scores arrive already filtered by `threshold()` (see TopKPair). Each query owns a row of
    one int64 buffer (Q, k + max(k, 128)) that new keys are appended to, unordered; only
    when a query's row would overflow is it merged down to its best k (a `topk` over the
    row, which also raises its threshold), and only the rows that overflow, so a stream
    whose candidates fit pays for one selection per query, in `finish()`.
    """

    def __init__(self, n_query: int, k: int, sign: int = 1):
        if sign not in (1, -1):
            raise ValueError(f"sign must be 1 (proponents) or -1 (opponents), got {sign}")
        self.k, self.sign = k, sign
        self._buf = torch.full((n_query, k + max(k, 128)), EMPTY, dtype=torch.int64)
        self.fill = torch.zeros(n_query, dtype=torch.int64)  # slots used in each row
        self.kth = torch.full((n_query,), EMPTY, dtype=torch.int64)

    def threshold(self) -> torch.Tensor:
        """(Q, 1) float32: the k-th best score merged so far in sign-adjusted units (-inf while
        unknown); any score that can still enter is at or above it."""
        return decode(self.kth[:, None], 1)[0]

    def add_dense(self, scores: torch.Tensor, rows: torch.Tensor, start: int = 0) -> None:
        """Every score of queries start.. (scores (q, T), rows (T,)), in chunks of queries."""
        step = max(1, _CHUNK // max(1, scores.shape[1]))
        for lo in range(0, scores.shape[0], step):
            part = encode(scores[lo : lo + step] * self.sign, rows)
            a, b = start + lo, start + lo + part.shape[0]
            used = self._buf[a:b, : max(1, int(self.fill[a:b].max()))]
            self._store(slice(a, b), merge_keys(used, part, self.k, False))

    def add_candidates(self, qi: torch.Tensor, keys: torch.Tensor) -> None:
        """Candidates as (query index (n,) grouped by query, key (n,)) appended to their rows;
        a row that would overflow is merged first (and the candidates filtered again)."""
        n_query, width = self._buf.shape
        counts = torch.bincount(qi, minlength=n_query)
        over = (self.fill + counts > width).nonzero().flatten()
        if len(over):
            self._merge(over)
            keep = keys > self.kth.index_select(0, qi)  # keys are unique: strictly better
            qi, keys = qi[keep], keys[keep]
            counts = torch.bincount(qi, minlength=n_query)
            over = (self.fill + counts > width).nonzero().flatten()
            if len(over):  # more new candidates than free slots: select among them all
                sub = _padded(qi, keys, counts)[over]
                self._store(over, merge_keys(self._buf[over, : self.k], sub, self.k, False))
                drop = torch.zeros(n_query, dtype=torch.bool).index_fill_(0, over, True)
                keep = ~drop.index_select(0, qi)
                qi, keys = qi[keep], keys[keep]
                counts = counts.index_fill_(0, over, 0)
        # slot of candidate j: its row's first free slot + its rank within its query's run
        offset = self.fill + torch.arange(n_query) * width - (torch.cumsum(counts, 0) - counts)
        slot = offset.index_select(0, qi) + torch.arange(qi.numel())
        self._buf.view(-1).index_copy_(0, slot, keys)
        self.fill += counts

    def finish(self) -> torch.Tensor:
        """Keys (Q, k), best first, after merging every row: an unordered `topk`, then numpy's
        sort (several times faster than torch's on int64 rows), a cache-sized block of rows
        at a time."""
        used = self._buf[:, : max(self.k, int(self.fill.max()))]
        out = np.empty((used.shape[0], self.k), dtype=np.int64)
        step = query_block(used.shape[1])
        for lo in range(0, used.shape[0], step):
            best = torch.topk(used[lo : lo + step], self.k, dim=1, sorted=False).values
            flipped = np.invert(best.numpy(), out=out[lo : lo + step])  # reverses the order
            flipped.sort(axis=1)
            np.invert(flipped, out=flipped)
        self._store(slice(None), torch.from_numpy(out))
        return torch.from_numpy(out)

    def rank_score(self, rank: int) -> torch.Tensor:
        """(Q, 1) float32: per query the rank-th best score held (sign-adjusted), -inf where
        fewer are held. What is held is a subset of what was added, so this is at most the
        rank-th best of everything added. Selected among the keys' high words (the scores),
        twice as fast as among the keys."""
        high = (self._buf[:, : max(rank, int(self.fill.max()))] >> 32).to(torch.int32)
        at = high.shape[1] - rank
        kth = torch.from_numpy(np.partition(high.numpy(), at, axis=1)[:, at : at + 1])
        return decode(kth.to(torch.int64) << 32)[0]  # an empty slot's high word gives EMPTY

    def _merge(self, which: torch.Tensor) -> None:
        """Rows `which` down to their best k keys."""
        used = self._buf[which, : int(self.fill[which].max())]
        if used.shape[1] > self.k:
            self._store(which, torch.topk(used, self.k, dim=1, sorted=False).values)

    def _store(self, which: torch.Tensor | slice, keys: torch.Tensor) -> None:
        """Rows `which` (indices, or a slice: cheaper) now hold exactly `keys` (rows, k):
        later slots emptied."""
        used = int(self.fill[which].max()) if len(keys) else 0
        if used > self.k:
            self._buf[which, self.k : used] = EMPTY
        self._buf[which, : self.k] = keys
        self.fill[which] = self.k
        self.kth[which] = keys.amin(dim=1)


class TopKPair:
    """Proponents (highest scores) and opponents (lowest) of a stream of (Q, T) tiles.

    A tile is filtered block by block of queries, each block while it is still in cache
    (`scan`, called by the scorer right after a block of the GEMM), by one of two filters
    per side, whichever the previous tile's pass rate makes cheaper:

    - group: the block's columns are split into `GROUP` interleaved groups {w, w + W, ...}
      and each query's maximum (minimum) over every group taken (vectorised reductions, far
      cheaper per score than a compare that writes a mask); only groups whose extremum
      reaches the side's threshold are opened and their scores compared one by one. When
      few scores qualify (a small top-k), most groups stay closed;
    - mask: every score is compared with the threshold into a reused mask whose nonzero
      positions are the candidates. When a few percent of the scores qualify (a large
      top-k), so many groups open that this plain pass is cheaper.

    `add` then moves the tile's candidates into the running lists.

    With `expected_rows` (the stream's length) the first tile also sets a floor per query:
    the score that about 1.5-2 k of all rows are expected to reach, read off the top ranks
    of the tile's group extrema (the r-th best group extremum is at most the r-th best
    score, so the floor errs low). Scores below the floor are dropped from the start, which
    skips the warm-up in which most scores would qualify; as more rows are seen the floor
    rises (`_raise_floor`). A query whose k-th best ends below its floor is reported by
    `shortfall()` and must be rescored without one.
    """

    def __init__(self, n_query: int, k: int, expected_rows: int | None = None):
        self.k = k
        self.n_query = n_query
        self.props = RunningTopK(n_query, k, 1)
        self.opps = RunningTopK(n_query, k, -1)
        self.expected_rows = expected_rows
        self.floor: tuple[torch.Tensor, torch.Tensor] | None = None
        self._started = False
        self._seen = 0  # rows added so far
        self._floor_seen = 0  # rows the floor was last estimated from
        # later in the stream a higher floor saves fewer candidates than its selection costs
        self._raise_until = (expected_rows or 0) // 2
        self._pass_rate = [1.0, 1.0]  # per side, the last tile's share of candidates
        self._scan: TileScan | None = None

    def scan(self, block: torch.Tensor, start: int) -> None:
        """Queries start.. (q of them) of the tile being scored: block (q, T) float32,
        contiguous. Call for every block in order of `start`, then `add` the whole tile."""
        if start == 0:
            masked = [rate >= MASK_PASS_RATE for rate in self._pass_rate]
            self._scan = TileScan(block.shape[1], self._bounds(), masked)
        scan = self._scan
        if scan is None or start != scan.covered:
            raise ValueError(
                f"scan blocks must cover the tile's queries in order from 0, got {start}"
            )
        scan.covered += block.shape[0]
        if not self._started:  # the floor needs the whole first tile's extrema first
            scan.extrema.append(group_extrema(block))
            return
        scan.collect(block.numpy())

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
        low_words = _LOW - rows
        for side, top in enumerate((self.props, self.opps)):
            if scan.dense[side]:  # warm-up: most scores qualify, select from the whole tile
                top.add_dense(scores, rows)
                self._pass_rate[side] = 1.0
                continue
            found = 0
            for flat, values in scan.runs(side, scores.numpy()):
                _add_flat(top, scores.shape[1], flat, values, low_words)
                found += flat.size
            self._pass_rate[side] = found / max(1, scores.numel())
        self._seen += scores.shape[1]
        if self.floor is not None and 2 * self._floor_seen <= self._seen <= self._raise_until:
            self._raise_floor()

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

    def _floor_rank(self, seen: int) -> int:
        """The rank among `seen` rows that the final k-th best score is all but certain to
        reach: its expected rank there plus four standard deviations and a margin."""
        expected = self.k * seen / self.expected_rows
        return math.ceil(expected + 4.0 * math.sqrt(expected) + 8.0)

    def _estimate_floor(
        self, n_tile: int, high: torch.Tensor, low: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-query (high, low) floors from the first tile's group extrema, or None when
        not worth it."""
        if self.expected_rows is None:
            return None
        rank = self._floor_rank(n_tile)
        if rank > high.shape[1] // 4:
            return None
        self._floor_seen = n_tile
        at = high.shape[1] - rank
        hi = np.partition(high.numpy(), at, axis=1)[:, at : at + 1]
        lo = np.partition(low.numpy(), rank - 1, axis=1)[:, rank - 1 : rank]
        return torch.from_numpy(hi), torch.from_numpy(lo)

    def _raise_floor(self) -> None:
        """Each time the rows seen double (in the stream's first half), the floor rises to
        the score of the same safe rank among them (read off the held scores, a subset of
        the seen ones, so it errs low): with more rows seen the rank's relative margin
        shrinks, and so do the candidates that the floor lets through."""
        rank = self._floor_rank(self._seen)
        self._floor_seen = self._seen
        if rank > self.k:
            return
        hi, lo = self.floor
        hi = torch.maximum(hi, self.props.rank_score(rank))
        lo = torch.minimum(lo, -self.opps.rank_score(rank))
        self.floor = hi, lo

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


def _add_flat(
    side: RunningTopK, n_cols: int, flat: np.ndarray, values: np.ndarray, low: torch.Tensor
) -> None:
    """Candidates of a (Q, n_cols) tile, as flat indices (grouped by query) and their scores,
    into `side`'s rows; low (n_cols,): the tile's `_LOW - row`."""
    flat = torch.from_numpy(flat)
    qi = torch.div(flat, n_cols, rounding_mode="floor")
    values = torch.from_numpy(values)
    adjusted = values + 0.0 if side.sign > 0 else 0.0 - values  # also folds -0.0 into +0.0
    side.add_candidates(qi, _pack(adjusted, low.index_select(0, flat - qi * n_cols)))


def _padded(qi: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Ragged per-query keys (qi ascending) -> (Q, max count) padded with EMPTY."""
    out = torch.full((counts.numel(), int(counts.max())), EMPTY, dtype=torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    out[qi, torch.arange(qi.numel()) - starts[qi]] = keys
    return out
