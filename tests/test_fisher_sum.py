"""The Fisher sums (`grass_dist.scoring.fisher_sum`): the same sums however the rows are
split, and exact to float64 rounding, which influence at a small damping needs."""

import numpy as np
import pytest
import torch

from grass_dist.scoring.fisher_sum import FisherSum, gram
from grass_dist.scoring.precondition import Preconditioner
from tests.test_precondition import dense_inverse, realistic_phi


def test_accumulated_fisher_is_the_gram_of_all_rows_however_split():
    # Rows arriving shard by shard (pieces of any size, crossing the 1024-row GEMM blocks)
    # give bit for bit the sums of one gram over all of them, and the float64 reference
    # within float64 rounding (the float32 products are exact).
    rng = np.random.default_rng(3)
    sizes = (7, 130, 1, 1000, 900, 128)
    blocks = [{"a": rng.standard_normal((r, 24), dtype=np.float32)} for r in sizes]
    x = np.concatenate([b["a"] for b in blocks])
    acc = FisherSum.accumulate(blocks)
    assert acc.n == len(x) == sum(sizes)
    assert np.array_equal(acc.sums["a"], gram(x))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(acc.matrix("a"), x64.T @ x64, rtol=1e-13, atol=1e-11)
    assert FisherSum.accumulate([]).n == 0


@pytest.mark.parametrize("delta", [1e-4, 1e-7])
def test_influence_at_a_small_damping_is_exact_where_h_has_a_null_space(delta):
    # A softmax output layer's gradients sum to zero over its classes, and fewer rows than
    # dimensions leave more of H zero: rounding in the sums falls on those directions too,
    # and (H + lambda I)^-1 divides it by a small lambda. float32 sums were 2 % off at 1e-4.
    rng = np.random.default_rng(5)
    n, classes, inputs = 150, 10, 33  # k = 330 > n
    delta_out = rng.dirichlet(np.ones(classes), n) - np.eye(classes)[rng.integers(0, classes, n)]
    acts = rng.standard_normal((n, inputs))
    phi = np.einsum("nc,ni->nci", delta_out, acts).reshape(n, -1).astype(np.float32)
    query = phi[:8] + 0.1 * rng.standard_normal((8, phi.shape[1])).astype(np.float32)
    pre = Preconditioner.from_fisher(FisherSum.of({"out": phi}))
    got = pre.layers["out"].inverse_apply(torch.from_numpy(query), delta).numpy()
    x = phi.astype(np.float64)
    h = x.T @ x / n
    lam = delta * np.trace(h) / h.shape[0]
    want = np.linalg.solve(h + lam * np.eye(h.shape[0]), query.astype(np.float64).T).T
    # Scores against the training rows, as influence uses them, relative to the largest.
    err = np.abs(x @ got.T - x @ want.T).max() / np.abs(x @ want.T).max()
    assert err < 1e-6, err


def test_fisher_sum_in_parts_matches_the_float64_product_on_realistic_data():
    x = realistic_phi(5000, 1100, seed=3)  # several 1024-row blocks and 512-column strips
    parts = [FisherSum.of({"a": x[lo : lo + 1500]}) for lo in range(0, 5000, 1500)]
    total = parts[0] + parts[1] + parts[2] + parts[3]
    x64 = x.astype(np.float64)
    want = x64.T @ x64
    assert total.n == 5000
    got = total.matrix("a")
    assert np.array_equal(got, got.T) and np.abs(got - want).max() / np.abs(want).max() < 1e-13
    query = {"a": realistic_phi(6, 1100, seed=4)}
    got = Preconditioner.from_fisher(total).precondition_queries(query, 1e-3)["a"]
    exact = (torch.tensor(query["a"], dtype=torch.float64) @ dense_inverse(x, 1e-3)).numpy()
    assert np.abs(x64 @ (got - exact).T).max() / np.abs(x64 @ exact.T).max() < 1e-5
