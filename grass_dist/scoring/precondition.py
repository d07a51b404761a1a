"""Per-layer empirical Fisher of the compressed gradients: its factorisations, damping and
file format.

H_l = (1/n) sum_i phi_il phi_il^T map-reduces over shards (`grass_dist.scoring.fisher_sum`).

(H_l + lambda_l I)^-1, lambda_l = delta * trace(H_l) / k_l, is applied through the Cholesky
factor L of H_l + lambda_l I (two triangular solves); W = L^-T whitens for self-influence,
W W^T = (H_l + lambda_l I)^-1. The eigendecomposition H_l = U diag(e) U^T applies any delta
without refactorising, which the damping=auto sweep needs; it costs ~10-50x a Cholesky, so
it is computed only when asked for (`Preconditioner.eigendecompose`).

Store format (safetensors) 3, metadata {"grass_dist": the JSON of {"delta": "0.001",
"format": "3", "layers": "a,b", "sha256": the hex sha256 of the file's data, "source": ...}
with sorted keys}; triangles packed row by row (half the bytes of the full matrices: 268 MB
instead of 537 MB for two layers at k=4096):
    n              (1,) int64                 rows summed
    NAME.fisher    (k (k + 1) / 2,) float64   H_l's upper triangle (`pack_triangle`)
    NAME.cholesky  (k (k + 1) / 2,) float64   L_l's lower triangle for metadata delta (absent
                                              when delta is "")
A file whose data does not match its sha256 is refused as damaged (files written before the
sha256 was recorded load unchecked). Format 2 held the same as full (k, k) matrices;
format 1, written before (no "format" key), NAME.eigvals (k,) and NAME.eigvecs (k, k): it
loads as an eigenbasis and is applied through it, giving the same answers as before. Both
still load.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from grass_dist.errors import ConfigError, CorruptPreconditionerError
from grass_dist.scoring.fisher_sum import EMPTY_INDEX, FisherSum, fisher_matrix
from grass_dist.scoring.packing import (
    UNSEALED,
    data_sha256,
    pack_triangle,
    packed_size,
    safetensors_buffer,
    seal,
    symmetric_,
    unpack_triangle,
)

FORMAT = "3"
_READS = ("2", FORMAT)  # formats with H (format 1, eigenbasis only, is told by its keys)
_META = "grass_dist"  # the one safetensors metadata key: the JSON of the fields below
_SINGULAR = (
    "the preconditioner is singular at this damping (H has zero eigenvalues and lambda = 0); "
    "set precondition.damping > 0"
)

LayerMap = Callable[[Callable[[torch.Tensor], Any], dict[str, torch.Tensor]], dict[str, Any]]


def serial_map(fn: Callable[[torch.Tensor], Any], tensors: dict[str, torch.Tensor]) -> dict:
    """{name: fn(tensor)} one layer after another (runtime.fisher.layer_map runs in parallel)."""
    return {name: fn(t) for name, t in tensors.items()}


def relative_damping(h: torch.Tensor, delta: float) -> float:
    """Absolute damping lambda = delta * trace(H) / k."""
    return delta * float(torch.trace(h)) / h.shape[0]


Factor = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # L, or (e, U) of `eigen_factor`


def cholesky_factor(h: torch.Tensor, delta: float) -> Factor:
    """Lower L (k, k) with L L^T = H + lambda I; a clear error when that is singular.

    At lambda = 0 a rank-deficient H may factorise with pivots at rounding level instead of
    failing, so pivots below k * eps * max diag(H) count as singular too. At lambda > 0 the
    factorisation fails only by rounding: H, summed in float64 from fewer rows than its
    dimensions, has eigenvalues a rounding error below 0 that a small lambda (delta 1e-7)
    does not lift. H is positive semi-definite, so its eigendecomposition clipped at 0
    (`eigen_factor`) is returned instead, which applies every lambda > 0 exactly.
    """
    lam = relative_damping(h, delta)
    damped = h.clone()  # the one (k, k) temporary: H + lambda I, no identity matrix
    damped.diagonal().add_(lam)
    factor, info = torch.linalg.cholesky_ex(damped)
    del damped
    if int(info) != 0:
        if lam > 0:
            return eigen_factor(h)
        raise ConfigError(_SINGULAR)
    floor = h.shape[0] * torch.finfo(h.dtype).eps * float(h.diagonal().abs().max())
    if lam == 0 and float(factor.diagonal().min()) ** 2 <= floor:
        raise ConfigError(_SINGULAR)
    # Row-major, as a loaded factor is (LAPACK's is column-major): `inverse_apply` then reads
    # every factor in one layout, computed here or loaded, and gives the same bits.
    return factor.contiguous()


def eigen_factor(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e ascending, clipped at 0; U columns) with H = U diag(e) U^T."""
    e, u = torch.linalg.eigh(h)
    return e.clamp_min(0.0), u


def _map_tensors(state: dict[str, Any], fn: Callable) -> dict[str, Any]:
    """`LayerFactor` state with `fn` applied to every matrix in it."""
    return {
        "fisher": None if state["fisher"] is None else fn(state["fisher"]),
        "eigen": None if state["eigen"] is None else tuple(fn(x) for x in state["eigen"]),
        "cholesky": {d: fn(f) for d, f in state["cholesky"].items()},
    }


@dataclass
class LayerFactor:
    """One layer's H and what has been factorised of it.

    `fisher` is None only for format-1 files, which hold the eigendecomposition alone.
    With an eigendecomposition present every delta is applied through it; otherwise through
    the Cholesky factor of that delta (computed on first use, kept per delta).
    """

    fisher: torch.Tensor | None  # (k, k) float64
    eigen: tuple[torch.Tensor, torch.Tensor] | None = None  # (e, U), see eigen_factor
    cholesky: dict[float, torch.Tensor] = field(default_factory=dict)  # delta -> L

    def __getstate__(self) -> dict[str, Any]:
        # As numpy arrays: Ray moves those between processes without pickling their bytes
        # (about 1 s less per pair of (4096, 4096) float64 matrices than torch tensors).
        return _map_tensors(vars(self), lambda t: t.numpy())

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Not copied, though an array Ray hands over is read-only (its shared memory): these
        # matrices are never written in place (warns "not writable" otherwise).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            vars(self).update(_map_tensors(state, torch.from_numpy))

    @property
    def k(self) -> int:
        return int(self.fisher.shape[0] if self.fisher is not None else self.eigen[0].numel())

    @property
    def trace(self) -> float:
        return float(torch.trace(self.fisher) if self.fisher is not None else self.eigen[0].sum())

    def damping(self, delta: float) -> float:
        """Absolute damping lambda = delta * trace(H) / k."""
        return delta * self.trace / self.k

    def keep(self, delta: float, factor: Factor) -> None:
        """Keep `cholesky_factor`'s answer at `delta`: L for that delta, or the
        eigendecomposition through which the layer applies every delta."""
        if isinstance(factor, tuple):
            self.eigen = factor
        else:
            self.cholesky[delta] = factor

    def factor(self, delta: float) -> torch.Tensor | None:
        """L with L L^T = H + lambda I for `delta` (factorised once per delta); None when the
        layer applies its dampings through its eigendecomposition."""
        if self.eigen is None and delta not in self.cholesky:
            self.keep(delta, cholesky_factor(self.fisher, delta))
        return None if self.eigen is not None else self.cholesky[delta]

    def inverse_apply(self, q: torch.Tensor, delta: float) -> torch.Tensor:
        """(Q, k) -> q (H + lambda I)^-1, float64."""
        factor = self.factor(delta)
        if factor is not None:
            # Two triangular solves on the row-major factor: cholesky_solve would copy it to
            # column-major first, 4x the solves' own time at k=4096 with 20 queries.
            y = torch.linalg.solve_triangular(factor, q.double().T, upper=False)
            return torch.linalg.solve_triangular(factor.mT, y, upper=True).T
        e, u = self.eigen
        inv = 1.0 / (e + self.damping(delta))
        if not torch.isfinite(inv).all():
            raise ConfigError(_SINGULAR)
        return ((q.double() @ u) * inv) @ u.T

    def whitener(self, delta: float) -> torch.Tensor:
        """W (k, k) with W W^T = (H + lambda I)^-1, so tau(i, i) = ||phi_i W||^2."""
        factor = self.factor(delta)
        if factor is not None:
            eye = torch.eye(self.k, dtype=factor.dtype)
            return torch.linalg.solve_triangular(factor, eye, upper=False).T  # L^-T
        e, u = self.eigen
        return u * (1.0 / (e + self.damping(delta))).sqrt()


@dataclass
class Preconditioner:
    layers: dict[str, LayerFactor]
    n: int
    delta: float | None = None  # the damping whose Cholesky factors `to_bytes` stores
    source: str = ""  # what H was summed from (`grass_dist.runtime.fisher.fisher_source`)

    @classmethod
    def from_fisher(cls, fisher: FisherSum) -> Preconditioner:
        """H_l = sums / n per layer, nothing factorised yet (see `factorise`)."""
        if fisher.n == 0:
            raise ValueError(EMPTY_INDEX)
        return cls(
            {n: LayerFactor(fisher_matrix([s], fisher.n)) for n, s in fisher.sums.items()}, fisher.n
        )

    def _fishers(self, missing: Callable[[LayerFactor], bool]) -> dict[str, torch.Tensor]:
        return {n: f.fisher for n, f in self.layers.items() if f.fisher is not None and missing(f)}

    def factorise(self, delta: float, layer_map: LayerMap = serial_map) -> Preconditioner:
        """Cholesky factors at `delta` for every layer lacking one (layers via `layer_map`);
        they are what `to_bytes` stores next to H."""
        todo = self._fishers(lambda f: f.eigen is None and delta not in f.cholesky)
        for name, factor in layer_map(partial(cholesky_factor, delta=delta), todo).items():
            self.layers[name].keep(delta, factor)
        self.delta = delta
        return self

    def keep_factors(self, delta: float) -> Preconditioner:
        """Drop the Cholesky factors of every damping but `delta` (a k x k matrix per layer
        each): a process that stays up across calls at many dampings holds one set."""
        for f in self.layers.values():
            f.cholesky = {d: L for d, L in f.cholesky.items() if d == delta}
        return self

    def eigendecompose(self, layer_map: LayerMap = serial_map) -> Preconditioner:
        """Eigendecompose every layer's H (for sweeping many deltas); later applications of
        any delta go through the eigenbasis."""
        todo = self._fishers(lambda f: f.eigen is None)
        for name, eigen in layer_map(eigen_factor, todo).items():
            self.layers[name].eigen = eigen
        return self

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
        """Format 3 (see the module docstring): H per layer, and L at `delta` when
        factorised, each as its packed triangle."""
        return bytes(self.to_buffer())

    def to_buffer(self) -> memoryview:
        """`to_bytes` as a buffer, each triangle packed straight into its place in the
        file (no copy of the file's bytes: what the reducer writes to the store)."""
        stored = {}
        for name, f in self.layers.items():
            if f.fisher is None:
                raise ValueError(
                    "a format-1 preconditioner (eigendecomposition only) cannot be saved "
                    "again; rebuild it with the precondition stage"
                )
            stored[f"{name}.fisher"] = (f.fisher, False)
            if self.delta is not None and self.delta in f.cholesky:
                stored[f"{name}.cholesky"] = (f.cholesky[self.delta], True)
        layout = {"n": (np.int64, 1)}
        layout.update(
            {key: (np.float64, packed_size(m.shape[0])) for key, (m, _) in stored.items()}
        )
        delta = "" if self.delta is None else repr(self.delta)
        meta = {"format": FORMAT, "layers": ",".join(self.layers), "delta": delta}
        meta["sha256"] = UNSEALED
        if self.source:
            meta["source"] = self.source
        # One metadata entry, so the same preconditioner is the same bytes wherever it is built.
        buf, views = safetensors_buffer(layout, {_META: json.dumps(meta, sort_keys=True)})
        views["n"][0] = self.n
        for key, (m, lower) in stored.items():
            pack_triangle(m, lower, out=views[key])
        seal(buf)
        return memoryview(buf)

    @classmethod
    def from_bytes(cls, data: bytes) -> Preconditioner:
        """A stored preconditioner; CorruptPreconditionerError (saying why) when `data` is no
        preconditioner file or does not match the sha256 its header records."""
        try:
            meta = _metadata(data)
            sealed = meta.get("sha256")
            if sealed is not None and sealed != data_sha256(data):
                raise CorruptPreconditionerError(
                    f"its data does not match the sha256 its header records ({len(data)} bytes)"
                )
            tensors = st_load(data)
            n = int(tensors["n"][0])
        except (SafetensorError, ValueError, KeyError, IndexError, AttributeError) as exc:
            # Cut short, or bytes that are not a safetensors file (JSONDecodeError, too).
            raise CorruptPreconditionerError(
                f"it is no readable safetensors file ({type(exc).__name__}: {exc})"
            ) from exc
        if "format" not in meta:  # format 1: the eigendecomposition only
            names = [k.removesuffix(".eigvals") for k in tensors if k.endswith(".eigvals")]
            eigen = {m: (tensors[f"{m}.eigvals"], tensors[f"{m}.eigvecs"]) for m in names}
            return cls({m: LayerFactor(None, e) for m, e in eigen.items()}, n)
        if meta["format"] not in _READS:
            raise ValueError(
                f"preconditioner store format {meta['format']!r} is newer than this version "
                f"reads ({FORMAT!r}); upgrade grass_dist or rebuild the preconditioner"
            )
        packed = meta["format"] != "2"
        delta = float(meta["delta"]) if meta["delta"] else None
        layers = {}
        for name in meta["layers"].split(","):
            fisher, chol = tensors[f"{name}.fisher"], tensors.get(f"{name}.cholesky")
            if packed:
                fisher = symmetric_(unpack_triangle(fisher))
                chol = None if chol is None else unpack_triangle(chol, lower=True)
            layers[name] = LayerFactor(fisher, None, {} if chol is None else {delta: chol})
        return cls(layers, n, delta, meta.get("source", ""))


def stored_source(f: Any) -> str:
    """The `source` of a stored preconditioner, from the file object `f`'s header alone
    ("" for one that records none); CorruptPreconditionerError when that header is
    unreadable."""
    size = int.from_bytes(f.read(8), "little")
    try:
        meta = json.loads(f.read(size)).get("__metadata__") or {}
        return json.loads(meta[_META]).get("source", "") if _META in meta else ""
    except (ValueError, AttributeError) as exc:  # not JSON, or JSON of another shape
        raise CorruptPreconditionerError(f"its header is unreadable ({exc})") from exc


def _metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of safetensors bytes (8-byte header length, then a JSON header)."""
    size = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    return json.loads(meta[_META]) if _META in meta else meta
