"""Compression methods by name: the one table of every compressor class.

The table is written out here rather than filled by decorators as each compressor module
is imported, so which methods exist never depends on what happened to be imported first.
Adding a method touches its own module plus `REGISTRY`.
"""

from __future__ import annotations

from grass_dist.compress.base import Compressor
from grass_dist.compress.dense import GaussianJL, RademacherJL
from grass_dist.compress.flat import GraSSCompressor, RandomMaskCompressor, SJLTCompressor
from grass_dist.compress.learned import (
    SelectiveFactGraSSCompressor,
    SelectiveGraSSCompressor,
    SelectiveMaskCompressor,
)
from grass_dist.compress.linear import FactGraSSCompressor, IdentityCompressor, LoGraCompressor
from grass_dist.errors import ConfigError

REGISTRY: dict[str, type[Compressor]] = {
    cls.method: cls
    for cls in (
        IdentityCompressor,
        FactGraSSCompressor,
        LoGraCompressor,
        GraSSCompressor,
        SJLTCompressor,
        RandomMaskCompressor,
        GaussianJL,
        RademacherJL,
        SelectiveFactGraSSCompressor,
        SelectiveGraSSCompressor,
        SelectiveMaskCompressor,
    )
}


def methods() -> list[str]:
    """Method names, sorted."""
    return sorted(REGISTRY)


def compressor_class(method: str, where: str = "compression.method") -> type[Compressor]:
    """The class of `method`; ConfigError naming `where` if unknown."""
    try:
        return REGISTRY[method]
    except KeyError:
        raise ConfigError(f"{where}={method!r} is unknown; choose one of {methods()}") from None
