"""The identity of a model's weights and settings, without importing the model zoo.

Workers and the driver hash the weights they hold; the fingerprint carries the hash, so a
replica whose model differs is caught before it computes anything. The fingerprint also
carries the hash of the model's settings (its submodules and their plain attributes), so an
index of the same weights run otherwise (another temperature, activation) is another index.
"""

from __future__ import annotations

import hashlib
import types
from typing import Any

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


# A module's public attributes that say where its weights came from, not what it computes
# (a Hugging Face model's checkpoint path): the same weights loaded from elsewhere are the
# same model.
_PROVENANCE = frozenset({"name_or_path"})


def _plain(value: Any) -> str | None:
    """A stable text of a plain attribute value (numbers, strings, dtypes, functions, and
    tuples or lists of them); None for anything else (objects, dicts: the state of a
    library, which may change as the model is used)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return f"{type(value).__name__}:{value!r}"
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        return None if None in items else f"{type(value).__name__}[{','.join(items)}]"
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        return f"fn:{value.__module__}.{value.__qualname__}"
    return None


def module_settings(model: nn.Module) -> str:
    """What, beside its weights, decides what `model` computes, as far as its attributes
    say: every submodule's name and class, and its public attributes that hold plain values
    or functions (a temperature, an activation's name, `nn.Linear`'s sizes). Two models with
    the same weights and other settings are other models: each its own index."""
    lines = []
    for name, module in model.named_modules():
        kind = type(module)
        lines.append(f"{name}:{kind.__module__}.{kind.__qualname__}")
        for key, value in sorted(vars(module).items()):
            if key.startswith("_") or key == "training" or key in _PROVENANCE:
                continue
            text = _plain(value)
            if text is not None:
                lines.append(f"  {key}={text}")
    return "\n".join(lines)


def settings_hash(model: nn.Module) -> str:
    """sha256 hex of `module_settings`."""
    return hashlib.sha256(module_settings(model).encode()).hexdigest()
