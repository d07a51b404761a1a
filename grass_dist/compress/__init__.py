"""Gradient compressors, built from the `compression` config for each captured layer.

Every method is named in one table (`registry.py`); Linear layers use
`compression.method`, other layers `compression.other`, and `compression.overrides`
names a method for individual layers (by layer name or module class name).
"""

from __future__ import annotations

from grass_dist.compress.base import (
    Compressor,
    FlatShape,
    LayerShape,
    LinearShape,
    linear_gradient,
)
from grass_dist.compress.dense import GaussianJL, RademacherJL
from grass_dist.compress.flat import GraSSCompressor, RandomMaskCompressor, SJLTCompressor
from grass_dist.compress.learned import GradSample, LearnedCompressor
from grass_dist.compress.linear import (
    FactGraSSCompressor,
    IdentityCompressor,
    LoGraCompressor,
    factor_sizes,
)
from grass_dist.compress.registry import compressor_class, methods
from grass_dist.compress.sketch import SJLT, random_mask
from grass_dist.config import CompressionConfig
from grass_dist.errors import ConfigError

LinearCompressor = Compressor  # the name the first pipeline used for the interface


def method_for(cfg: CompressionConfig, name: str, shape: LayerShape) -> tuple[str, str]:
    """(method, config field it came from) for one layer.

    With `compression.whole_small_layers` a layer whose gradient has at most k entries is
    kept whole (identity): no method can compress it below k, and its exact gradient costs
    no more columns than k.
    """
    if cfg.whole_small_layers and shape.numel <= cfg.k:
        return "identity", "compression.whole_small_layers"
    kind = "Linear" if isinstance(shape, LinearShape) else shape.kind
    for key in (name, kind):
        if key in cfg.overrides:
            return cfg.overrides[key], f"compression.overrides.{key}"
    if isinstance(shape, LinearShape):
        return cfg.method, "compression.method"
    return cfg.other, "compression.other"


def whole_layers(cfg: CompressionConfig, shapes: dict[str, LayerShape]) -> list[str]:
    """Layers that `compression.whole_small_layers` keeps whole, in layer order."""
    return [
        n for n, s in shapes.items() if method_for(cfg, n, s)[1] == "compression.whole_small_layers"
    ]


def build_compressor(
    cfg: CompressionConfig, name: str, shape: LayerShape, state: bytes | None = None
) -> Compressor:
    """The compressor of one layer; learned methods need their fitted `state` bytes."""
    method, where = method_for(cfg, name, shape)
    cls = compressor_class(method, where)
    if issubclass(cls, LearnedCompressor):
        if state is None:
            return cls.from_config(cfg, name, shape)  # refuses, saying how to fit it
        return cls.from_state(cfg, name, shape, state)
    return cls.from_config(cfg, name, shape)


def build_compressors(
    cfg: CompressionConfig,
    shapes: dict[str, LayerShape],
    states: dict[str, bytes] | None = None,
) -> dict[str, Compressor]:
    """One compressor per layer, in the given layer order."""
    states = states or {}
    return {n: build_compressor(cfg, n, s, states.get(n)) for n, s in shapes.items()}


def learned_layers(cfg: CompressionConfig, shapes: dict[str, LayerShape]) -> list[str]:
    """Layers whose method is learned (and so needs a fitted state)."""
    return [n for n, s in shapes.items() if compressor_class(*method_for(cfg, n, s)).learned]


def check_compressors(cfg: CompressionConfig, shapes: dict[str, LayerShape]) -> None:
    """Refuse any layer's compression settings before a job writes or computes anything.

    Non-learned compressors are built once and dropped (masks and sketch plans only; dense
    JL draws its matrix lazily); learned ones are checked without fitting.
    """
    kinds = {"Linear" if isinstance(s, LinearShape) else s.kind for s in shapes.values()}
    unused = sorted(set(cfg.overrides) - set(shapes) - kinds)
    if unused:
        raise ConfigError(
            f"compression.overrides.{unused[0]} names neither an attributed layer nor the "
            f"kind of one, so it would change nothing: the layers are {list(shapes)}, of "
            f"kinds {sorted(kinds)}. Fix the name, or add the layer to index.layers"
        )
    for name, shape in shapes.items():
        cls = compressor_class(*method_for(cfg, name, shape))
        if issubclass(cls, LearnedCompressor):
            cls.check(cfg, name, shape)
        else:
            cls.from_config(cfg, name, shape)


__all__ = [
    "SJLT",
    "Compressor",
    "FactGraSSCompressor",
    "FlatShape",
    "GaussianJL",
    "GradSample",
    "GraSSCompressor",
    "IdentityCompressor",
    "LayerShape",
    "LearnedCompressor",
    "LinearCompressor",
    "LinearShape",
    "LoGraCompressor",
    "RademacherJL",
    "RandomMaskCompressor",
    "SJLTCompressor",
    "build_compressor",
    "build_compressors",
    "check_compressors",
    "compressor_class",
    "factor_sizes",
    "learned_layers",
    "linear_gradient",
    "method_for",
    "methods",
    "random_mask",
    "whole_layers",
]
