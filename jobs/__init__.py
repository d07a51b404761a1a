"""Hydra entry points: `python -m jobs.<name> [overrides]`. Logic lives in grass_dist/."""
