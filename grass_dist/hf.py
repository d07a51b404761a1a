"""Stable `_target_` path `grass_dist.hf.hf_causal_lm`; the loader lives in grass_dist.models.hf."""

from grass_dist.models.hf import hf_causal_lm

__all__ = ["hf_causal_lm"]
