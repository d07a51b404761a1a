"""Streaming scores: train tiles against preconditioned queries with a running top-k.

tau(i, t) = sum_l phi_{t,l}^T (H_l + lambda_l I)^-1 phi_{i,l}. The preconditioner is applied
once on the query side; each train tile costs one GEMM per layer. No stage holds an
n_train x n_query matrix: tiles are folded into a top-k of proponents (largest) and
opponents (smallest) per query and, on request, written out tile by tile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from grass_dist.index import GradientIndex, ShardRecord
from grass_dist.precondition import Preconditioner


@dataclass
class TopK:
    """Best `k` scores per query: values (Q, k) float64 and train rows (Q, k) int64.

    `largest=True` keeps proponents, `largest=False` opponents; unfilled slots are +-inf/-1.
    """

    values: torch.Tensor
    rows: torch.Tensor
    largest: bool

    @classmethod
    def empty(cls, n_query: int, k: int, largest: bool) -> TopK:
        fill = -np.inf if largest else np.inf
        return cls(
            torch.full((n_query, k), fill, dtype=torch.float64),
            torch.full((n_query, k), -1, dtype=torch.int64),
            largest,
        )

    def update(self, scores: torch.Tensor, rows: torch.Tensor) -> None:
        """Fold a tile: scores (n_tile, Q), rows (n_tile,)."""
        vals = torch.cat([self.values, scores.T.double()], dim=1)
        cand = torch.cat([self.rows, rows.expand(scores.shape[1], -1)], dim=1)
        self.values, self.rows = _best(vals, cand, self.values.shape[1], self.largest)

    def merge(self, other: TopK) -> TopK:
        vals = torch.cat([self.values, other.values], dim=1)
        cand = torch.cat([self.rows, other.rows], dim=1)
        return TopK(*_best(vals, cand, self.values.shape[1], self.largest), self.largest)


def _best(
    vals: torch.Tensor, cand: torch.Tensor, k: int, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    # Ties break towards the lower train row so the result never depends on tiling.
    order = torch.argsort(cand, dim=1, stable=True)
    vals, cand = vals.gather(1, order), cand.gather(1, order)
    idx = torch.argsort(vals, dim=1, descending=largest, stable=True)[:, :k]
    return vals.gather(1, idx), cand.gather(1, idx)


@dataclass
class ScorePartial:
    """What one scorer returns for its group of train shards."""

    proponents: TopK
    opponents: TopK
    self_rows: np.ndarray  # (m,) int64
    self_keys: list[str]
    self_influence: np.ndarray  # (m,) float64

    def merge(self, other: ScorePartial) -> ScorePartial:
        return ScorePartial(
            self.proponents.merge(other.proponents),
            self.opponents.merge(other.opponents),
            np.concatenate([self.self_rows, other.self_rows]),
            self.self_keys + other.self_keys,
            np.concatenate([self.self_influence, other.self_influence]),
        )


def tile_scores(
    train_phi: dict[str, torch.Tensor], query_pre: dict[str, torch.Tensor]
) -> torch.Tensor:
    """sum_l phi_train_l (n, k) @ query_pre_l^T (k, Q) -> (n, Q) float32."""
    out = None
    for name, q in query_pre.items():
        part = train_phi[name] @ q.T
        out = part if out is None else out.add_(part)
    return out


def score_records(
    index: GradientIndex,
    records: Iterable[ShardRecord],
    query_pre: dict[str, np.ndarray],
    topk: int,
    *,
    preconditioner: Preconditioner | None = None,
    delta: float = 0.0,
    tile_rows: int = 4096,
    verify: bool = True,
    dense_sink: Callable[[ShardRecord, np.ndarray, np.ndarray], None] | None = None,
) -> ScorePartial:
    """Score every row of `records` against the preconditioned queries (Q, k) per layer.

    With a `preconditioner`, self-influence tau(i, i) is computed in the same pass.
    `dense_sink(record, rows, scores (n, Q) float32)` receives each shard's dense block.
    """
    layers = list(query_pre)
    q = {n: torch.tensor(np.asarray(x), dtype=torch.float32) for n, x in query_pre.items()}
    n_query = next(iter(q.values())).shape[0]
    props, opps = TopK.empty(n_query, topk, True), TopK.empty(n_query, topk, False)
    whiten = (
        {n: preconditioner.layers[n].whitener(delta).float() for n in layers}
        if preconditioner is not None
        else None
    )
    self_rows, self_keys, self_vals = [], [], []
    for record in records:
        data = index.read(record, layers=layers, verify=verify)
        rows = torch.tensor(data.row_ids)
        # Arrow hands out read-only buffers; one copy per shard gives torch its own.
        phi = {n: torch.tensor(x) for n, x in data.phi.items()}
        blocks = []
        for lo in range(0, len(rows), tile_rows):
            tile = {n: x[lo : lo + tile_rows] for n, x in phi.items()}
            scores = tile_scores(tile, q)
            props.update(scores, rows[lo : lo + tile_rows])
            opps.update(scores, rows[lo : lo + tile_rows])
            if dense_sink is not None:
                blocks.append(scores.numpy())
            if whiten is not None:
                s = sum((tile[n] @ whiten[n]).square().sum(1).double() for n in layers)
                self_vals.append(s.numpy())
        if dense_sink is not None:
            dense_sink(
                record,
                data.row_ids,
                np.concatenate(blocks) if blocks else np.zeros((0, n_query), np.float32),
            )
        if whiten is not None:
            self_rows.append(data.row_ids)
            self_keys.extend(data.keys)
        # Release this shard (tiles are views of it) before reading the next: one at a time.
        data = phi = tile = blocks = None
    return ScorePartial(
        props,
        opps,
        np.concatenate(self_rows) if self_rows else np.zeros(0, np.int64),
        self_keys,
        np.concatenate(self_vals) if self_vals else np.zeros(0, np.float64),
    )
