"""Exact running top-k per query over a stream of score tiles.

A (score, train row) pair is packed into one int64 key whose integer order is the ranking
order: higher score first and, on equal scores, the lower train row first. So a top-k is one
`torch.topk` over keys, ties never depend on how the rows were tiled or grouped, and the
partial results of any number of scorers merge exactly.

Key layout: the high 32 bits are the float32 score's bits mapped to a signed integer of the
same order; the low 32 bits are `2**32 - 1 - row`. Opponents (lowest scores) are the
proponents of the negated scores (negation is exact).

Per tile, the current k-th best score per query is a threshold: only scores at or above it
can enter, and after the first few tiles they are a small fraction. Those candidates wait in
a pool and are merged (one `topk` over k + pool columns) only when the pool fills, so the
merge cost is paid a few times per stream rather than once per tile.
"""

from __future__ import annotations

import math

import torch

EMPTY = torch.iinfo(torch.int64).min  # an unfilled slot; sorts below every real key
_LOW = 0xFFFFFFFF
MAX_ROW = _LOW - 1  # row 2**32 - 1 would make a key collide with EMPTY's low bits
_CHUNK = 1 << 21  # elements of int64 keys built at once on the dense path (16 MiB)


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
        """Keys (Q, k), best first, after merging every waiting candidate (one sorted topk)."""
        width = int(self.fill.max())
        out = torch.topk(self._buf[:, : self.k + width], self.k, dim=1, sorted=True).values
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

    One pass over each tile marks the scores that can enter either list. With
    `expected_rows` (the stream's length) the first tile also sets a floor per query: the
    score that about 1.5-2 k of all rows are expected to reach, read off the tile's top
    ranks. Scores below the floor are dropped from the start, which skips the warm-up in
    which most scores would qualify. A query that ends with fewer than k scores at or above
    its floor is reported by `shortfall()` and must be rescored without one.
    """

    def __init__(self, n_query: int, k: int, expected_rows: int | None = None):
        self.k = k
        self.props = RunningTopK(n_query, k, 1)
        self.opps = RunningTopK(n_query, k, -1)
        self.expected_rows = expected_rows
        self.floor: tuple[torch.Tensor, torch.Tensor] | None = None
        self._started = False
        self._mask: torch.Tensor | None = None

    def add(self, scores: torch.Tensor, rows: torch.Tensor) -> None:
        """Fold a tile: scores (Q, T) float32 (contiguous), rows (T,) int64."""
        if not self._started:
            self._started = True
            self.floor = self._estimate_floor(scores)
        hi, lo = self.props.threshold(), -self.opps.threshold()
        if self.floor is not None:
            hi, lo = torch.maximum(hi, self.floor[0]), torch.minimum(lo, self.floor[1])
        n_query, n_cols = scores.shape
        n = n_query * n_cols
        mask = self._mask_buffer(n)
        for side, bound in ((self.props, hi), (self.opps, lo)):
            compare = torch.ge if side is self.props else torch.le
            compare(scores, bound, out=mask[:n].view(n_query, n_cols))
            idx = _flat_nonzero(mask)
            if idx is None:  # warm-up: most scores qualify, select from the whole tile
                side.add_dense(scores, rows)
                continue
            qi = torch.div(idx, n_cols, rounding_mode="floor")
            values = scores.view(-1).index_select(0, idx)
            cand_rows = rows.index_select(0, idx - qi * n_cols)
            side.add_candidates(qi, encode(values * side.sign, cand_rows))

    def _mask_buffer(self, n: int) -> torch.Tensor:
        """A bool buffer of n entries rounded up to whole int64 words, padding False."""
        words = -(-n // 8)
        if self._mask is None or self._mask.numel() < 8 * words:
            self._mask = torch.empty(8 * words, dtype=torch.bool)
        self._mask[n : 8 * words] = False
        return self._mask[: 8 * words]

    def _estimate_floor(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-query (high, low) floors from the first tile, or None when not worth it."""
        if self.expected_rows is None:
            return None
        n_tile = scores.shape[1]
        expected = self.k * n_tile / self.expected_rows  # rank of the final k-th in this tile
        rank = math.ceil(expected + 4.0 * math.sqrt(expected) + 8.0)
        if rank > n_tile // 4:
            return None
        hi = torch.topk(scores, rank, dim=1, sorted=False).values.amin(1, keepdim=True)
        lo = torch.topk(scores, rank, dim=1, largest=False, sorted=False).values.amax(1, True)
        return hi, lo

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(proponent keys, opponent keys), each (Q, k) best first."""
        return self.props.finish(), self.opps.finish()

    def shortfall(self) -> torch.Tensor:
        """Indices of queries whose floor dropped rows they needed (call after finish)."""
        if self.floor is None:
            return torch.zeros(0, dtype=torch.int64)
        short = (self.props.keys == EMPTY).any(1) | (self.opps.keys == EMPTY).any(1)
        return short.nonzero().flatten()


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor | None:
    """Indices of the True entries of a flat bool mask (length a multiple of 8), ascending;
    None when most of its 8-entry words hold one (the caller then takes everything).

    Scanning int64 words first reads the mask once at 1/8 of the entries; only the words
    that hold a True are unpacked to bytes.
    """
    words = mask.view(torch.int64)
    hit = words.nonzero().flatten()
    if hit.numel() > words.numel() // 2:
        return None
    word, byte = words.index_select(0, hit).view(torch.uint8).view(-1, 8).nonzero(as_tuple=True)
    return hit.index_select(0, word) * 8 + byte


def _padded(qi: torch.Tensor, keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Ragged per-query keys (qi ascending) -> (Q, max count) padded with EMPTY."""
    out = torch.full((counts.numel(), int(counts.max())), EMPTY, dtype=torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    out[qi, torch.arange(qi.numel()) - starts[qi]] = keys
    return out
