"""Per-sample gradients: layer capture (`capture`), whole-parameter per-sample gradients
(`persample`), the compressed-gradient computer (`computer`) and the fitted state of learned
compressors (`learned_state`).
"""
