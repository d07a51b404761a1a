"""The identity of a model's weights, without importing the model zoo.

Workers and the driver hash the weights they hold; the fingerprint carries the hash, so a
replica whose model differs is caught before it computes anything.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def state_hash(model: nn.Module) -> str:
    """sha256 hex of the state_dict: names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        # The header carries the byte count so that no two states hash the same stream.
        h.update(f"{name}\x1f{t.dtype}\x1f{tuple(t.shape)}\x1f{len(raw)}\n".encode())
        h.update(raw)
    return h.hexdigest()
