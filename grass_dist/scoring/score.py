"""Streaming scores of train rows against prepared queries, with a running top-k.

Score kinds, for a query t and a train row i with compressed gradients phi per layer l:

- influence: tau(i, t) = sum_l phi_{t,l}^T (H_l + lambda_l I)^-1 phi_{i,l};
- grad_dot:  sum_l phi_{t,l}^T phi_{i,l};
- cosine:    <phi_t, phi_i> / (||phi_t|| ||phi_i||), where phi is the concatenation of all
  layers (the cosine of the whole compressed gradient, not a sum of per-layer cosines);
  a zero gradient has cosine 0 with everything.

The query side is prepared once (preconditioned, or unit-normalised) into one (Q, K) matrix
over the concatenated layers, so each train tile costs one float32 GEMM. No stage holds an
n_train x n_query matrix: tiles fold into running top-k lists and, on request, go to a
dense sink one tile at a time.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from grass_dist.scoring.precondition import Preconditioner
from grass_dist.scoring.results import key_positions
from grass_dist.scoring.tile_filter import query_block
from grass_dist.scoring.topk import MAX_ROW, TopKPair, decode, merge_keys

log = logging.getLogger(__name__)

KINDS = ("influence", "grad_dot", "cosine")
_BLOCKED_GEMM_FLOATS = 1 << 19  # largest train tile (2 MiB) whose GEMM runs in query blocks


@dataclass
class QuerySide:
    """Queries ready to score: `matrix` (Q, K) float32 over the concatenated layers.

    `layers` lists (name, lo, hi) column ranges of each layer in the concatenation.
    """

    matrix: torch.Tensor
    layers: list[tuple[str, int, int]]
    kind: str

    @property
    def n_query(self) -> int:
        return int(self.matrix.shape[0])


def layer_slices(phi: dict[str, np.ndarray]) -> list[tuple[str, int, int]]:
    """(name, lo, hi) of each layer when the layers are concatenated in `phi`'s order."""
    out, lo = [], 0
    for name, x in phi.items():
        out.append((name, lo, lo + int(np.shape(x)[1])))
        lo += int(np.shape(x)[1])
    return out


def concat(phi: dict[str, np.ndarray]) -> torch.Tensor:
    """{layer: (n, k_l)} -> (n, sum k_l) float32, a fresh (writable) tensor."""
    parts = [np.asarray(x, dtype=np.float32) for x in phi.values()]
    return torch.from_numpy(np.concatenate(parts, axis=1))


_NORM_CHUNK = 1 << 20  # elements converted to float64 at once by row_norms


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """(n, K) -> (n,) float64 Euclidean norms of the rows, summed in float64 in chunks."""
    step = max(1, _NORM_CHUNK // max(1, x.shape[1]))
    parts = [
        torch.linalg.vector_norm(x[lo : lo + step].double(), dim=1)
        for lo in range(0, x.shape[0], step)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def unit_rows(x: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of x (n, K) float32 divided by their norms (n,) float64; zero rows stay zero."""
    norms = row_norms(x) if norms is None else norms
    inverse = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    return x * inverse.to(x.dtype)[:, None]


def prepare_queries(
    phi: dict[str, np.ndarray],
    kind: str,
    preconditioner: Preconditioner | None = None,
    damping: float = 0.0,
) -> QuerySide:
    """Query phi {layer: (Q, k_l)} -> the (Q, K) matrix each train tile multiplies."""
    if kind not in KINDS:
        raise ValueError(f"score kind {kind!r} is unknown; use one of {list(KINDS)}")
    if kind == "influence":
        if preconditioner is None:
            raise ValueError("influence scores need a preconditioner")
        phi = preconditioner.precondition_queries(phi, damping, "influence")
    matrix = concat(phi)
    if kind == "cosine":
        matrix = unit_rows(matrix)
    return QuerySide(matrix, layer_slices(phi), kind)


TrainKeys = tuple[np.ndarray, pa.Array]  # (sorted unique train rows (n,) int64, their keys)


def join_keys(a: TrainKeys, b: TrainKeys) -> TrainKeys:
    """The keys of both, rows sorted and unique."""
    rows = np.concatenate([a[0], b[0]])
    rows, first = np.unique(rows, return_index=True)
    return rows, pa.concat_arrays([a[1], b[1]]).take(pa.array(first))


def keys_of_rows(keys: TrainKeys, rows: np.ndarray) -> TrainKeys:
    """`keys` of `rows` (each among `keys`' rows; in any order, repeats allowed)."""
    return rows, keys[1].take(pa.array(key_positions(keys[0], rows)))


@dataclass
class ScorePartial:
    """What scoring a set of train rows yields: proponents / opponents, (Q, k) int64 keys
    (see grass_dist.scoring.topk), and the train keys of the rows they rank when the scorer
    kept them (`runtime.scoring.score_records` does). Other per-row outputs
    (self-influence, norms) are not kept here: they go to a sink block by block, so a
    scorer's memory does not grow with the number of rows it scores."""

    proponents: torch.Tensor
    opponents: torch.Tensor
    train_keys: TrainKeys | None = None

    def rows(self) -> np.ndarray:
        """The train rows it ranks, sorted and unique."""
        both = torch.cat([decode(k)[1].reshape(-1) for k in (self.proponents, self.opponents)])
        return np.unique(both[both >= 0].numpy())

    def merge(self, other: ScorePartial) -> ScorePartial:
        k = self.proponents.shape[1]
        merged = ScorePartial(
            merge_keys(self.proponents, other.proponents, k),
            merge_keys(self.opponents, other.opponents, k),
        )
        if self.train_keys is not None and other.train_keys is not None:
            both = join_keys(self.train_keys, other.train_keys)
            merged.train_keys = keys_of_rows(both, merged.rows())  # the ranked rows' only
        return merged


@dataclass
class Block:
    """Train rows to score: rows (n,) int64, keys, phi (n, K) float32 (layers concatenated).

    `name` identifies the block in dense part names (a shard id); `norms` (n,) float64 are
    the rows' norms when already known (a cache computes them once).
    """

    rows: np.ndarray
    keys: list[str]
    phi: torch.Tensor
    name: str = ""
    norms: torch.Tensor | None = None


DenseSink = Callable[[int, np.ndarray, torch.Tensor], None]
# (block, self_influence (n,) float64, grad_norm_sq (n,) float64) for every block scored
DiagSink = Callable[[Block, np.ndarray, np.ndarray], None]


class TileScorer:
    """Folds blocks of train rows into top-k proponents and opponents for one QuerySide.

    whiteners: per layer W_l (k_l, k_l) with W W^T = (H_l + lambda_l I)^-1; when given,
    `add` also returns the block's diagonals (self-influence ||phi_i W||^2 and
    ||phi_i||^2), computed in the same pass. dense_sink(tile_start, rows, scores (Q, t)
    float32) receives every tile (tile_start counts rows within a block). Nothing per row
    is kept between blocks: memory is the top-k state, one tile and the caller's block.
    expected_rows: how many rows will be added, if known (lets the top-k set a floor).
    """

    def __init__(
        self,
        query: QuerySide,
        topk: int,
        tile_rows: int = 4096,
        whiteners: dict[str, torch.Tensor] | None = None,
        expected_rows: int | None = None,
    ):
        # The (Q, tile) score buffer is capped at 2**24 floats (64 MiB) for large query sets.
        tile_rows = min(tile_rows, max(256, (1 << 24) // max(1, query.n_query)))
        self.query, self.tile_rows = query, tile_rows
        self.top = TopKPair(query.n_query, topk, expected_rows)
        self.whiteners = whiteners
        self._buf = torch.empty(query.n_query * tile_rows, dtype=torch.float32)

    def add(
        self,
        rows: np.ndarray,
        phi: torch.Tensor,
        dense_sink: DenseSink | None = None,
        norms: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """A block of train rows: rows (n,) int64, phi (n, K) float32 (concatenated),
        optionally their norms (n,) float64.

        Returns the block's (self_influence (n,), grad_norm_sq (n,)) float64 when the
        scorer has whiteners, else None.
        """
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) > MAX_ROW):
            raise ValueError(f"train rows must lie in [0, {MAX_ROW}]")
        if norms is None and (self.query.kind == "cosine" or self.whiteners is not None):
            norms = row_norms(phi)
        rows_t = torch.from_numpy(np.array(rows, dtype=np.int64))  # a writable copy
        self_inf: list[np.ndarray] = []
        for lo in range(0, len(rows), self.tile_rows):
            hi = lo + self.tile_rows
            tile = phi[lo:hi]
            scores = self._scores(tile, None if norms is None else norms[lo:hi])
            self.top.add(scores, rows_t[lo:hi])
            if dense_sink is not None:
                dense_sink(lo, rows[lo:hi], scores)
            if self.whiteners is not None:
                self_inf.append(self._self_influence(tile))
        if self.whiteners is None:
            return None
        total = np.concatenate(self_inf) if self_inf else np.zeros(0, np.float64)
        return total, (norms**2).numpy()

    def _scores(self, tile: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
        """(t, K) train tile -> (Q, t) float32 scores.

        At small K the GEMM runs a cache-sized block of queries at a time and each block
        goes to the top-k's scan while still in cache: cheaper than one GEMM and then passes
        over the whole tile from memory. A large train tile (large K) would be re-read from
        memory by every block, so it gets one GEMM and the top-k scans the result itself.
        """
        if self.query.kind == "cosine":
            tile = unit_rows(tile, norms)
        n_query, n_cols = self.query.n_query, tile.shape[0]
        out = self._buf[: n_query * n_cols].view(n_query, n_cols)
        if tile.numel() > _BLOCKED_GEMM_FLOATS:
            return torch.matmul(self.query.matrix, tile.T, out=out)
        step = query_block(n_cols)
        for lo in range(0, n_query, step):
            block = out[lo : lo + step]
            torch.matmul(self.query.matrix[lo : lo + step], tile.T, out=block)
            self.top.scan(block, lo)
        return out

    def _self_influence(self, tile: torch.Tensor) -> np.ndarray:
        total = torch.zeros(tile.shape[0], dtype=torch.float64)
        for name, lo, hi in self.query.layers:
            total += (tile[:, lo:hi] @ self.whiteners[name]).square().sum(1, dtype=torch.float64)
        return total.numpy()

    def finish(self) -> ScorePartial:
        return ScorePartial(*self.top.finish())


def score_stream(
    query: QuerySide,
    blocks: Callable[[], Iterable[Block]],
    topk: int,
    tile_rows: int = 4096,
    *,
    expected_rows: int | None = None,
    whiteners: dict[str, torch.Tensor] | None = None,
    dense_sink: Callable[[Block, int, np.ndarray, torch.Tensor], None] | None = None,
    diag_sink: DiagSink | None = None,
) -> ScorePartial:
    """Score every block `blocks()` yields; exact top-k even when the floor was too high.

    With `whiteners`, each block's diagonals go to `diag_sink` as soon as it is scored.

    Queries reported by TopKPair.shortfall are rescored over a second `blocks()` stream
    without a floor (top-k only), so `blocks` must yield the same rows each call.
    """
    scorer = TileScorer(query, topk, tile_rows, whiteners, expected_rows)
    for block in blocks():
        sink = functools.partial(dense_sink, block) if dense_sink is not None else None
        diag = scorer.add(block.rows, block.phi, sink, block.norms)
        if diag is not None and diag_sink is not None:
            diag_sink(block, *diag)
    partial = scorer.finish()
    short = scorer.top.shortfall()
    if len(short):
        log.info("rescoring %d of %d queries without a floor", len(short), query.n_query)
        sub = QuerySide(query.matrix[short], query.layers, query.kind)
        redo = score_stream(sub, blocks, topk, tile_rows)
        partial.proponents[short] = redo.proponents
        partial.opponents[short] = redo.opponents
    return partial


def whiteners_for(
    preconditioner: Preconditioner, layers: list[str], damping: float
) -> dict[str, torch.Tensor]:
    """Per-layer float32 W_l with W W^T = (H_l + lambda_l I)^-1 (for self-influence)."""
    return {n: preconditioner.layers[n].whitener(damping).float() for n in layers}


def layer_scores(query: QuerySide, q_index: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Per-layer terms of the score of pairs (query q_index[j], train phi[j]) -> (n, L).

    The terms sum to the pair's score; for cosine each is <q_l, phi_l> / (||q|| ||phi||).
    """
    if query.kind == "cosine":
        phi = unit_rows(phi)
    q = query.matrix[q_index]
    return torch.stack([(q[:, lo:hi] * phi[:, lo:hi]).sum(1) for _, lo, hi in query.layers], dim=1)
