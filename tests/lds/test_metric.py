"""The LDS metric against hand-computed cases."""

import numpy as np
import pytest

from grass_dist.fidelity.metric import (
    bootstrap_ci,
    lds,
    predictions,
    rank_average,
    spearman_columns,
)


def test_ranks_share_ties():
    x = np.array([[3.0], [1.0], [3.0], [2.0]])
    np.testing.assert_array_equal(rank_average(x)[:, 0], [3.5, 1.0, 3.5, 2.0])


def test_spearman_by_hand():
    # Column 0: same order -> 1. Column 1: reversed -> -1. Column 2: ranks (1,2,3,4) vs
    # (2,1,4,3): d = (1,1,1,1), rho = 1 - 6 * 4 / (4 * 15) = 0.6. Column 3: constant -> NaN.
    a = np.array([[1.0, 1, 1, 5], [2, 2, 2, 5], [3, 3, 3, 5], [4, 4, 4, 5]])
    b = np.array([[10.0, 4, 2, 1], [20, 3, 1, 2], [30, 2, 4, 3], [40, 1, 3, 4]])
    rho = spearman_columns(a, b)
    np.testing.assert_allclose(rho[:3], [1.0, -1.0, 0.6])
    assert np.isnan(rho[3])


def test_spearman_with_ties_is_pearson_of_average_ranks():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(12, 5)).astype(float)
    b = rng.standard_normal((12, 5))
    ra, rb = rank_average(a), rank_average(b)
    want = [np.corrcoef(ra[:, q], rb[:, q])[0, 1] for q in range(5)]
    np.testing.assert_allclose(spearman_columns(a, b), want)


def test_lds_of_a_hand_made_case():
    # 3 training rows, 2 queries, 4 subsets.
    scores = np.array([[1.0, 0.0], [2.0, -1.0], [4.0, 3.0]])  # tau (n_train=3, Q=2)
    masks = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0]], dtype=bool)
    # yhat column 0: (3, 5, 6, 1); column 1: (-1, 3, 2, 0).
    np.testing.assert_allclose(predictions(masks, scores), [[3, -1], [5, 3], [6, 2], [1, 0]])
    y = np.array([[0.1, 0.0], [0.2, 0.3], [0.3, 0.1], [0.0, 0.2]])
    # Query 0: y ranks (2,3,4,1) = yhat ranks -> 1. Query 1: yhat ranks (1,4,3,2), y ranks
    # (1,4,2,3): d^2 = 0+0+1+1 -> rho = 1 - 6*2/60 = 0.8.
    result = lds(scores, masks, y, n_boot=200)
    np.testing.assert_allclose(result.per_query, [1.0, 0.8])
    assert result.mean == pytest.approx(0.9) and result.queries == 2
    assert 0.8 <= result.low <= result.mean <= result.high <= 1.0


def test_nan_queries_are_skipped_and_shapes_checked():
    scores = np.array([[1.0, 0.0], [2.0, 0.0]])  # query 1 gets constant predictions
    masks = np.array([[1, 0], [0, 1], [1, 1]], dtype=bool)
    y = np.array([[1.0, 5.0], [2.0, 6.0], [3.0, 7.0]])
    result = lds(scores, masks, y, n_boot=10)
    assert result.queries == 1 and result.mean == pytest.approx(1.0)
    assert np.isnan(result.per_query[1])
    with pytest.raises(ValueError, match="shapes disagree"):
        lds(scores, masks[:, :1], y)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = np.r_[np.linspace(0, 1, 50), np.nan]
    low, high = bootstrap_ci(values, 500, seed=3)
    assert (low, high) == bootstrap_ci(values, 500, seed=3)
    assert low < 0.5 < high
