"""Models: the digits zoo (`digits`), a tiny causal LM (`tiny_lm`), Hugging Face (`hf`), and
`state.state_hash`, the identity of a model's weights (importing it loads no model).

`grass_dist.models.digits_mlp` and `grass_dist.models.digits_cnn` stay valid `_target_`
paths: they resolve lazily to `grass_dist.models.digits`.
"""

from __future__ import annotations

from grass_dist import lazy_attributes

__getattr__, __dir__ = lazy_attributes(
    __name__, dict.fromkeys(["digits_mlp", "digits_cnn", "train_on"], "grass_dist.models.digits")
)
