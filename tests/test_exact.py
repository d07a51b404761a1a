"""Exact influence through the Gram matrix (Woodbury) against a direct p x p inverse."""

import numpy as np
import pytest
import torch

from grass_dist.fidelity.exact import ExactInfluence, all_parameter_gradients
from grass_dist.tasks.classifier import ClassificationTask
from tests.helpers import mlp, per_sample_grads


def _data(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    return list(zip(x, y, strict=True))


def _direct(train: np.ndarray, query: np.ndarray, delta: float) -> np.ndarray:
    g, q = train.astype(np.float64), query.astype(np.float64)
    n, p = g.shape
    h = g.T @ g / n
    lam = delta * np.trace(h) / p
    return g @ np.linalg.solve(h + lam * np.eye(p), q.T)  # (n, Q)


def test_all_parameter_gradients_match_torch_func():
    model = mlp()  # 6 -> 8 -> 4: p = 56 + 36 = 92
    items = _data(10)
    got = all_parameter_gradients(model, ClassificationTask(), items, batch_size=4)
    x, y = torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])
    ref = per_sample_grads(model, x, y)
    want = torch.cat([ref[n].reshape(10, -1) for n, _ in model.named_parameters()], 1)
    assert got.shape == (10, 92)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n", [30, 200])  # fewer and more training rows than parameters
def test_woodbury_scores_equal_the_direct_inverse(n):
    model = mlp()
    task = ClassificationTask()
    train = all_parameter_gradients(model, task, _data(n, 1))
    query = all_parameter_gradients(model, task, _data(5, 2))
    exact = ExactInfluence.fit(train)
    for delta in (1e-4, 1e-1, 10.0):
        np.testing.assert_allclose(
            exact.scores(query, delta), _direct(train, query, delta), rtol=1e-6, atol=1e-9
        )
    with pytest.raises(ValueError, match="delta > 0"):
        exact.scores(query, 0.0)
