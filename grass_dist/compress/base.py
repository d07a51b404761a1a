"""Layer shapes and the interface every compressor implements.

A compressor maps one layer's per-sample gradient to phi (B, k) float32. A Linear layer
hands over its two factors (inputs x and output gradients g), from which factorised
methods never form the gradient; any other layer hands over its flat per-sample gradient
vector v (B, p) (from `torch.func`). Flat methods accept both: for a Linear layer they
read the entries they need of vec(G), G = sum_t g_t a_t^T, a = [x, 1].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from grass_dist.errors import ConfigError


@dataclass(frozen=True)
class LinearShape:
    """Shape of a Linear layer's weight gradient: d_out x (d_in + bias)."""

    d_in: int
    d_out: int
    bias: bool

    @property
    def cols(self) -> int:
        return self.d_in + int(self.bias)

    @property
    def numel(self) -> int:
        return self.d_out * self.cols

    def spec(self) -> dict[str, Any]:
        return {"d_in": self.d_in, "d_out": self.d_out, "bias": self.bias}


@dataclass(frozen=True)
class FlatShape:
    """The parameters of a non-Linear module, flattened in `named_parameters` order.

    Attributes:
        kind: the module's class name (e.g. "Conv2d").
        params: (name relative to the module, shape) of each parameter.
    """

    kind: str
    params: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def numel(self) -> int:
        total = 0
        for _, shape in self.params:
            size = 1
            for d in shape:
                size *= d
            total += size
        return total

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": [[n, list(s)] for n, s in self.params]}


LayerShape = LinearShape | FlatShape


def linear_inputs(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """a = [x, 1] (bias) or x: (B, T, d_in) -> (B, T, cols)."""
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1) if bias else x


def linear_gradient(x: torch.Tensor, g: torch.Tensor, shape: LinearShape) -> torch.Tensor:
    """vec(G) of each sample, row-major with the bias column last: (B, d_out * cols) float32."""
    a = linear_inputs(x, shape.bias).float()
    grad = torch.bmm(g.transpose(1, 2).float(), a)
    return grad.reshape(grad.shape[0], -1)


def linear_entries(
    x: torch.Tensor, g: torch.Tensor, shape: LinearShape, idx: torch.Tensor
) -> torch.Tensor:
    """Entries `idx` of vec(G) without forming G: (B, len(idx)) float32, O(T len(idx)).

    Entry j of vec(G) is sum_t g_t[j // cols] a_t[j % cols].
    """
    a = linear_inputs(x, shape.bias).transpose(1, 2)  # (B, cols, T)
    g = g.transpose(1, 2)  # (B, d_out, T)
    rows, cols = idx // shape.cols, idx % shape.cols
    out = torch.zeros(x.shape[0], idx.numel(), dtype=torch.float32, device=x.device)
    # Gathering rows of the transposed factors is much faster than gathering columns when
    # idx repeats rows; sequence chunks bound the (B, len(idx), T) temporaries.
    step = max(1, (1 << 24) // max(1, x.shape[0] * idx.numel()))
    for lo in range(0, x.shape[1], step):
        gs = g[:, :, lo : lo + step].index_select(1, rows).float()
        out += (gs * a[:, :, lo : lo + step].index_select(1, cols).float()).sum(2)
    return out


class Compressor(ABC):
    """Maps one layer's per-sample gradient to phi (B, out_dim) float32.

    Subclasses are listed by `method` in `registry.REGISTRY` and are built with
    `from_config`. `factorised` ones only take a Linear layer's factors; `learned` ones
    are fitted to training gradients and rebuilt from their stored state (`learned.py`).
    """

    method: ClassVar[str]
    factorised: ClassVar[bool] = False
    learned: ClassVar[bool] = False

    def __init__(self, name: str, shape: LayerShape):
        if self.factorised:
            require_linear(self.method, name, shape)
        self.name = name
        self.shape = shape

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: Any, name: str, shape: LayerShape) -> Compressor:
        """Build from a CompressionConfig for one layer (validating sizes)."""

    @property
    @abstractmethod
    def out_dim(self) -> int: ...

    def compress(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Linear factors x (B, T, d_in), g (B, T, d_out) -> phi (B, out_dim) float32."""
        return self.compress_flat(linear_gradient(x, g, self.shape))

    def compress_flat(self, v: torch.Tensor) -> torch.Tensor:
        """Flat per-sample gradients v (B, p) -> phi (B, out_dim) float32."""
        raise NotImplementedError(f"{self.method} only compresses Linear layers")

    def spec(self) -> dict[str, Any]:
        """JSON description: part of the index fingerprint."""
        return {"method": self.method, **self.shape.spec(), "k": self.out_dim}

    def to(self, device: torch.device | str) -> Compressor:
        return self


def require_linear(method: str, name: str, shape: LayerShape) -> LinearShape:
    """`shape` if it is a Linear layer's, else a ConfigError for a factorised `method`."""
    if not isinstance(shape, LinearShape):
        raise ConfigError(
            f"compression method {method!r} is factorised and needs a Linear layer, but "
            f"{name!r} is a {shape.kind}; choose a flat method for it with "
            f"compression.other=grass or +compression.overrides.{name}=grass"
        )
    return shape


def check_k(k: int, name: str, shape: LayerShape) -> None:
    """Refuse a compressed size larger than the layer's gradient.

    Reached only with compression.whole_small_layers=false: otherwise such a layer is kept
    whole before its compressor is chosen (`compress.method_for`).
    """
    if k > shape.numel:
        raise ConfigError(
            f"compression.k={k} is larger than layer {name!r} allows: its gradient has "
            f"{shape.numel} entries. Keep such layers whole with "
            f"compression.whole_small_layers=true (the default), lower compression.k, "
            f"restrict index.layers, or set +compression.overrides.{name}=identity"
        )
