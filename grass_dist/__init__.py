"""grass_dist: distributed training-data attribution with GraSS / FactGraSS on Ray.

import grass_dist as gd
index = gd.Index.build(model, train_ds, store="outputs/api_index")
result = index.attribute(query_ds, topk=10)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Attribution", "Client", "Index"]


def lazy_attributes(
    package: str, homes: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module's `__getattr__`, which imports `homes[name]` on first use and returns its
    `name`, and its `__dir__`, which lists those names too (a misspelt `_target_` is told
    the near ones)."""
    import sys

    def __getattr__(name: str) -> Any:
        if name in homes:
            import importlib

            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *homes})

    return __getattr__, __dir__


# Lazy, so `import grass_dist.<module>` does not pay for torch, Ray or the client.
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "Client": "grass_dist.service.client",
        "Index": "grass_dist.api",
        "Attribution": "grass_dist.api",
    },
)
