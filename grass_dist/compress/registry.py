"""Compression methods by name: each compressor class registers itself under its `method`.

Adding a method touches its own module plus the import list in `compress/__init__.py`.
"""

from __future__ import annotations

from typing import TypeVar

from grass_dist.compress.base import Compressor
from grass_dist.errors import ConfigError

REGISTRY: dict[str, type[Compressor]] = {}

C = TypeVar("C", bound=type[Compressor])


def register(cls: C) -> C:
    """Class decorator: make `compression.method=<cls.method>` build `cls`."""
    if cls.method in REGISTRY and REGISTRY[cls.method] is not cls:
        raise ValueError(f"compression method {cls.method!r} is registered twice")
    REGISTRY[cls.method] = cls
    return cls


def methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(REGISTRY)


def compressor_class(method: str, where: str = "compression.method") -> type[Compressor]:
    """The class registered as `method`; ConfigError naming `where` if unknown."""
    try:
        return REGISTRY[method]
    except KeyError:
        raise ConfigError(f"{where}={method!r} is unknown; choose one of {methods()}") from None
