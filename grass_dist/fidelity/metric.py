"""The linear datamodeling score of attribution scores against retrained-model outputs.

For subsets S_j of the training set (as a 0/1 matrix M, (m, n_train)) and retrained
outputs y_j(t), the prediction is yhat_j(t) = sum_{i in S_j} tau(i, t) = (M @ tau)[j, t].
LDS(t) is the Spearman rank correlation over j of yhat_j(t) and y_j(t); the score of a
method is the mean over queries, skipping queries where it is undefined (constant ranks).
Only numpy is needed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def rank_average(x: np.ndarray) -> np.ndarray:
    """Ranks 1..m down axis 0 of x (m, Q), ties sharing their average rank (float64)."""
    x = np.asarray(x, dtype=np.float64)
    ranks = np.empty_like(x)
    for q in range(x.shape[1]):
        col = x[:, q]
        order = np.argsort(col, kind="stable")
        sorted_col = col[order]
        # Runs of equal values get the mean of the positions they span.
        starts = np.flatnonzero(np.r_[True, sorted_col[1:] != sorted_col[:-1]])
        ends = np.r_[starts[1:], len(col)]
        r = np.empty(len(col))
        for s, e in zip(starts, ends, strict=True):
            r[s:e] = (s + e + 1) / 2.0
        ranks[order, q] = r
    return ranks


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of a (m, Q) with the same column of b: (Q,).

    NaN where either column is constant (or holds a NaN).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"spearman_columns needs two (m, Q) arrays, got {a.shape} and {b.shape}")
    bad = np.isnan(a).any(0) | np.isnan(b).any(0)
    ra = rank_average(np.nan_to_num(a)) - (a.shape[0] + 1) / 2.0
    rb = rank_average(np.nan_to_num(b)) - (b.shape[0] + 1) / 2.0
    denom = np.sqrt((ra**2).sum(0) * (rb**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(0) / denom
    rho[bad | (denom == 0)] = np.nan
    return rho


def predictions(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """yhat (m, Q) = masks (m, n_train) @ scores (n_train, Q), in float64."""
    return np.asarray(masks, np.float64) @ np.asarray(scores, np.float64)


@dataclass(frozen=True)
class LdsResult:
    """Mean LDS over the queries where it is defined, with a bootstrap 95% interval."""

    mean: float
    low: float
    high: float
    queries: int  # queries with a defined correlation
    per_query: np.ndarray  # (Q,) float64, NaN where undefined

    def summary(self) -> dict[str, float | int]:
        return {
            "lds": self.mean,
            "ci95": [self.low, self.high],
            "queries": self.queries,
            "undefined_queries": int(np.isnan(self.per_query).sum()),
        }


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the mean of `values` (NaN skipped), resampling with replacement."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0 or n_boot <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def lds_from_predictions(
    yhat: np.ndarray, y: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> LdsResult:
    """LDS of predictions yhat (m, Q) against outputs y (m, Q)."""
    per_query = spearman_columns(yhat, y)
    defined = per_query[~np.isnan(per_query)]
    mean = float(defined.mean()) if defined.size else float("nan")
    low, high = bootstrap_ci(per_query, n_boot, seed)
    return LdsResult(mean, low, high, int(defined.size), per_query)


def lds(
    scores: np.ndarray, masks: np.ndarray, y: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> LdsResult:
    """LDS of scores tau (n_train, Q) given subset masks (m, n_train) and outputs y (m, Q)."""
    if scores.shape[0] != masks.shape[1] or y.shape != (masks.shape[0], scores.shape[1]):
        raise ValueError(
            f"LDS shapes disagree: scores {scores.shape} (n_train, Q), masks {masks.shape} "
            f"(m, n_train), outputs {y.shape} (m, Q)"
        )
    return lds_from_predictions(predictions(masks, scores), y, n_boot, seed)
