"""Exact uncompressed influence: the empirical Fisher of all parameters, via the Gram matrix.

With G (n, p) the per-sample gradients of every parameter (from `torch.func`) and
H = G^T G / n, influence is tau(i, t) = g_t^T (H + lambda I)^-1 g_i. The p x p inverse
is never formed: by the push-through (Woodbury) identity

    (G^T G / n + lambda I)^-1 G^T = n G^T (K + n lambda I)^-1,   K = G G^T (n x n),

so the scores of queries Q (q, p) are tau = n (K + n lambda I)^-1 G Q^T, (n, q). One
eigendecomposition K = V diag(s) V^T serves every damping. lambda is relative, as for the
compressed methods: lambda = delta * trace(H) / p, with trace(H) = trace(K) / n.
This is the ceiling the compressed methods are measured against; it costs O(n^2 p) time
and O(n p) memory, so it is for small models only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from grass_dist.gradients.persample import FlatGradients


def all_parameter_gradients(model: nn.Module, task, dataset, batch_size: int = 64) -> np.ndarray:
    """Per-sample gradients of every parameter of `model`: (len(dataset), p) float32.

    Columns follow `named_parameters` order, each parameter flattened row-major.
    """
    model = model.eval()
    flat = FlatGradients(model, task, [""])  # the root module: all parameters
    parts = []
    for lo in range(0, len(dataset), batch_size):
        batch = task.collate([dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))])
        parts.append(flat.per_sample(batch)[""].detach().numpy())
    return np.concatenate(parts)


@dataclass
class ExactInfluence:
    """K = G G^T of the training gradients, eigendecomposed once (float64)."""

    grads: torch.Tensor  # (n, p) float64
    eigvals: torch.Tensor  # (n,) ascending, clipped at 0
    eigvecs: torch.Tensor  # (n, n)

    @classmethod
    def fit(cls, grads: np.ndarray | torch.Tensor) -> ExactInfluence:
        """From training gradients G (n, p)."""
        g = torch.as_tensor(np.asarray(grads), dtype=torch.float64)
        s, v = torch.linalg.eigh(g @ g.T)
        return cls(g, s.clamp_min(0.0), v)

    @property
    def n(self) -> int:
        return self.grads.shape[0]

    @property
    def p(self) -> int:
        return self.grads.shape[1]

    def damping(self, delta: float) -> float:
        """Absolute lambda = delta * trace(H) / p."""
        return delta * float(self.eigvals.sum()) / self.n / self.p

    def scores(self, queries: np.ndarray | torch.Tensor, delta: float) -> np.ndarray:
        """tau (n, q) = n (K + n lambda I)^-1 G Q^T for query gradients Q (q, p)."""
        lam = self.damping(delta)
        if lam <= 0:
            raise ValueError(f"exact influence needs delta > 0 (got {delta})")
        q = torch.as_tensor(np.asarray(queries), dtype=torch.float64)
        gq = self.grads @ q.T  # (n, q)
        v = self.eigvecs
        return (self.n * (v * (1.0 / (self.eigvals + self.n * lam))) @ (v.T @ gq)).numpy()
