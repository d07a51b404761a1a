"""Deterministic seeds: every random choice derives from (run seed, layer name, stage).

Generators are always CPU generators so that the same seed yields the same mask and
the same sketch on every device and in every process; tensors are moved afterwards.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(run_seed: int, *parts: str) -> int:
    """A 63-bit seed from the run seed and string parts (layer name, stage, ...)."""
    text = "\x1f".join([str(int(run_seed)), *parts])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(run_seed: int, *parts: str) -> torch.Generator:
    """A CPU generator seeded from `derive_seed(run_seed, *parts)`."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(run_seed, *parts))
