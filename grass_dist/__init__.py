"""grass_dist: distributed training-data attribution with GraSS / FactGraSS on Ray."""

from __future__ import annotations

__all__ = ["Client"]


def __getattr__(name: str):
    # Lazy, so `import grass_dist.<module>` does not pay for the client's imports.
    if name == "Client":
        from grass_dist.client import Client

        return Client
    raise AttributeError(f"module 'grass_dist' has no attribute {name!r}")
