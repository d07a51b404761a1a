"""A dense running top-k over explicit score tiles (the damping sweep and ensembles).

The all-pairs scorer has its own key-packed top-k (grass_dist/scoring/topk.py); this simpler form
folds small dense (n, Q) tiles, where exact float64 values per slot are wanted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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


def tile_scores(
    train_phi: dict[str, torch.Tensor], query_pre: dict[str, torch.Tensor]
) -> torch.Tensor:
    """sum_l phi_train_l (n, k) @ query_pre_l^T (k, Q) -> (n, Q) float32."""
    out = None
    for name, q in query_pre.items():
        part = train_phi[name] @ q.T
        out = part if out is None else out.add_(part)
    return out
