"""grass_dist: distributed training-data attribution with GraSS / FactGraSS on Ray.

import grass_dist as gd
index = gd.Index.build(model, train_ds, store="outputs/api_index")
result = index.attribute(query_ds, topk=10)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Attribution", "Client", "Index"]


def lazy_attributes(package: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `homes[name]` on first use and returns its `name`."""

    def __getattr__(name: str) -> Any:
        if name in homes:
            import importlib

            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


# Lazy, so `import grass_dist.<module>` does not pay for torch, Ray or the client.
__getattr__ = lazy_attributes(
    __name__,
    {
        "Client": "grass_dist.service.client",
        "Index": "grass_dist.api",
        "Attribution": "grass_dist.api",
    },
)
