"""Models: the digits zoo (`digits`), a tiny causal LM (`tiny_lm`), Hugging Face (`hf`), and
`state.state_hash`, the identity of a model's weights (importing it loads no model).

`grass_dist.models.digits_mlp` and `grass_dist.models.digits_cnn` stay valid `_target_`
paths: they resolve lazily to `grass_dist.models.digits`.
"""

from __future__ import annotations

_HOMES = {
    "digits_mlp": "grass_dist.models.digits",
    "digits_cnn": "grass_dist.models.digits",
    "train_on": "grass_dist.models.digits",
}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'grass_dist.models' has no attribute {name!r}")
