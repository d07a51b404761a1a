"""Stable `_target_` path `grass_dist.tasks_lm.causal_lm`: grass_dist.tasks.language_model."""

from grass_dist.tasks.language_model import causal_lm

__all__ = ["causal_lm"]
