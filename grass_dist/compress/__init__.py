"""Gradient compressors, built from the `compression` config for each captured layer."""

from __future__ import annotations

from grass_dist.compress.linear import (
    FactGraSSCompressor,
    IdentityCompressor,
    LinearCompressor,
    LinearShape,
    factor_sizes,
)
from grass_dist.compress.sketch import SJLT, random_mask
from grass_dist.config import CompressionConfig
from grass_dist.errors import ConfigError

METHODS = ("identity", "factgrass")


def build_compressor(cfg: CompressionConfig, name: str, shape: LinearShape) -> LinearCompressor:
    """The compressor for one Linear layer; validates k against the layer's size."""
    if cfg.method == "identity":
        return IdentityCompressor(name, shape)
    if cfg.method == "factgrass":
        if cfg.k > shape.numel:
            raise ConfigError(
                f"compression.k={cfg.k} is larger than layer {name!r} allows: its gradient has "
                f"{shape.d_out}x{shape.cols}={shape.numel} entries. Lower compression.k, "
                f"restrict index.layers, or use compression=identity for small layers."
            )
        return FactGraSSCompressor(
            name,
            shape,
            k=cfg.k,
            seed=cfg.seed,
            blowup=cfg.blowup,
            mask_out=cfg.mask_out,
            mask_in=cfg.mask_in,
            sjlt_c=cfg.sjlt_c,
        )
    raise ConfigError(f"compression.method={cfg.method!r} is unknown; choose one of {METHODS}")


def build_compressors(
    cfg: CompressionConfig, shapes: dict[str, LinearShape]
) -> dict[str, LinearCompressor]:
    """One compressor per layer, in the given layer order."""
    return {name: build_compressor(cfg, name, shape) for name, shape in shapes.items()}


__all__ = [
    "SJLT",
    "FactGraSSCompressor",
    "IdentityCompressor",
    "LinearCompressor",
    "LinearShape",
    "build_compressor",
    "build_compressors",
    "factor_sizes",
    "random_mask",
]
