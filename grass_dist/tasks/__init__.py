"""Tasks define the per-sample loss whose gradient is attributed: `classifier`, `language_model`.

`grass_dist.tasks.classification` stays a valid `_target_` path: it resolves lazily to
`grass_dist.tasks.classifier.classification`.
"""

from __future__ import annotations

_HOMES = {
    "classification": "grass_dist.tasks.classifier",
    "causal_lm": "grass_dist.tasks.language_model",
}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'grass_dist.tasks' has no attribute {name!r}")
