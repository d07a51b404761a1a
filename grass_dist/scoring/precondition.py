"""Per-layer empirical Fisher of the compressed gradients, its eigendecomposition, damping.

H_l = (1/n) sum_i phi_il phi_il^T is a sum over rows, so it map-reduces over shards
exactly (accumulated in float64). Keeping U and e of H = U diag(e) U^T lets any relative
damping lambda_l = delta * trace(H_l) / k_l be applied later without refactorising.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


@dataclass
class FisherSum:
    """Unnormalised sums phi^T phi per layer ((k, k) float64) over `n` rows."""

    sums: dict[str, np.ndarray]
    n: int

    @classmethod
    def of(cls, phi: dict[str, np.ndarray]) -> FisherSum:
        sums = {}
        n = 0
        for name, x in phi.items():
            x64 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
            sums[name] = (x64.T @ x64).numpy()
            n = x.shape[0]
        return cls(sums, n)

    def __add__(self, other: FisherSum) -> FisherSum:
        if not self.sums:
            return other
        if not other.sums:
            return self
        return FisherSum({k: v + other.sums[k] for k, v in self.sums.items()}, self.n + other.n)


@dataclass
class LayerFactor:
    eigvals: torch.Tensor  # (k,) float64, ascending, clipped at 0
    eigvecs: torch.Tensor  # (k, k) float64, columns are eigenvectors

    @property
    def k(self) -> int:
        return int(self.eigvals.numel())

    @property
    def trace(self) -> float:
        return float(self.eigvals.sum())

    def damping(self, delta: float) -> float:
        """Absolute damping lambda = delta * trace(H) / k."""
        return delta * self.trace / self.k

    def inverse_apply(self, q: torch.Tensor, delta: float) -> torch.Tensor:
        """(Q, k) -> q (H + lambda I)^-1, float64."""
        lam = self.damping(delta)
        inv = 1.0 / (self.eigvals + lam)
        if not torch.isfinite(inv).all():
            raise ValueError(
                "the preconditioner is singular at this damping (H has zero eigenvalues and "
                "lambda = 0); set precondition.damping > 0"
            )
        u = self.eigvecs
        return ((q.double() @ u) * inv) @ u.T

    def whitener(self, delta: float) -> torch.Tensor:
        """W (k, k) with W W^T = (H + lambda I)^-1, so tau(i, i) = ||phi_i W||^2."""
        lam = self.damping(delta)
        return self.eigvecs * (1.0 / (self.eigvals + lam)).sqrt()


@dataclass
class Preconditioner:
    layers: dict[str, LayerFactor]
    n: int

    @classmethod
    def from_fisher(cls, fisher: FisherSum) -> Preconditioner:
        if fisher.n == 0:
            raise ValueError("cannot build a preconditioner from an empty index")
        layers = {}
        for name, s in fisher.sums.items():
            h = torch.from_numpy(s / fisher.n)
            e, u = torch.linalg.eigh(h)
            layers[name] = LayerFactor(e.clamp_min(0.0), u)
        return cls(layers, fisher.n)

    def precondition_queries(
        self, phi: dict[str, np.ndarray], delta: float, kind: str = "influence"
    ) -> dict[str, np.ndarray]:
        """Query phi (Q, k) per layer -> phi (H + lambda I)^-1 (or phi for grad-dot), float32."""
        if kind == "grad_dot":
            return {n: np.asarray(x, np.float32) for n, x in phi.items()}
        return {
            n: self.layers[n].inverse_apply(torch.tensor(np.asarray(x)), delta).float().numpy()
            for n, x in phi.items()
        }

    def to_bytes(self) -> bytes:
        tensors = {}
        for name, f in self.layers.items():
            tensors[f"{name}.eigvals"] = f.eigvals.contiguous()
            tensors[f"{name}.eigvecs"] = f.eigvecs.contiguous()
        tensors["n"] = torch.tensor([self.n], dtype=torch.int64)
        return st_save(tensors, metadata={"layers": ",".join(self.layers)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Preconditioner:
        tensors = st_load(data)
        names = [k.removesuffix(".eigvals") for k in tensors if k.endswith(".eigvals")]
        layers = {n: LayerFactor(tensors[f"{n}.eigvals"], tensors[f"{n}.eigvecs"]) for n in names}
        return cls(layers, int(tensors["n"][0]))
