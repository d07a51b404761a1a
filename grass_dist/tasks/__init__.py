"""Tasks define the per-sample loss whose gradient is attributed: `classifier`, `language_model`.

`grass_dist.tasks.classification` stays a valid `_target_` path: it resolves lazily to
`grass_dist.tasks.classifier.classification`.
"""

from __future__ import annotations

from grass_dist import lazy_attributes

__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "classification": "grass_dist.tasks.classifier",
        "causal_lm": "grass_dist.tasks.language_model",
    },
)
