"""grass_dist: distributed training-data attribution with GraSS / FactGraSS on Ray.

import grass_dist as gd
index = gd.Index.build(model, train_ds, store="outputs/api_index")
result = index.attribute(query_ds, topk=10)
"""

from __future__ import annotations

__all__ = ["Attribution", "Client", "Index"]

# Lazy, so `import grass_dist.<module>` does not pay for torch, Ray or the client.
_HOMES = {
    "Client": "grass_dist.service.client",
    "Index": "grass_dist.api",
    "Attribution": "grass_dist.api",
}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'grass_dist' has no attribute {name!r}")
