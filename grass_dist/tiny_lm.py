"""Stable `_target_` path `grass_dist.tiny_lm.tiny_gpt2`: grass_dist.models.tiny_lm."""

from grass_dist.models.tiny_lm import tiny_gpt2

__all__ = ["tiny_gpt2"]
