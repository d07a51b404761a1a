"""Causal language models from Hugging Face `transformers` (the optional extra `hf`).

A model is either built from a config with a seeded random initialisation or loaded with
`from_pretrained` from a local directory. The hub is never contacted: every load, here and
in grass_dist.data.tokenizer, passes `local_files_only=True`, so the process environment
(HF_HUB_OFFLINE and the like) is left to the caller.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from grass_dist.errors import ConfigError, MissingDependencyError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformers_module():
    """The `transformers` package, or a MissingDependencyError saying how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise MissingDependencyError(
            "Hugging Face models need the optional dependency `transformers`: "
            "pip install 'grass_dist[hf]'"
        ) from e
    # Progress bars of weight loading would flood worker logs.
    transformers.utils.logging.disable_progress_bar()
    return transformers


def torch_dtype(name: str) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' -> the torch dtype (model.dtype in configs)."""
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is unknown; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def hf_causal_lm(
    model_type: str | None = None,
    config: dict[str, Any] | None = None,
    pretrained: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
) -> nn.Module:
    """A transformers causal LM in eval mode, in `dtype`.

    Args:
        model_type: a transformers model type ("gpt2", "llama", ...) to build from `config`
            with random weights; ignored when `pretrained` is set.
        config: keyword arguments of that model type's config class (n_layer, hidden_size...).
        pretrained: a local directory written by `save_pretrained`; loaded without the hub.
        dtype: float32 | bfloat16 | float16.
        seed: seed of the random initialisation (the global RNG is left untouched).

    Returns:
        A module mapping input_ids (B, T) to an output with `.logits` (B, T, vocab).
    """
    transformers = transformers_module()
    target = torch_dtype(dtype)
    if pretrained is not None:
        if not os.path.isdir(pretrained):
            raise ConfigError(
                f"model.pretrained={pretrained!r} is not a local directory; save the model "
                f"there with `save_pretrained` (models are never downloaded at run time)"
            )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            pretrained, local_files_only=True, dtype=target
        )
    else:
        if model_type is None:
            raise ConfigError("set model.model_type (e.g. gpt2, llama) or model.pretrained")
        try:
            cfg = transformers.AutoConfig.for_model(model_type, **dict(config or {}))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.model_type={model_type!r}, model.config: {e}") from e
        # Workers each build the model: a private, seeded RNG makes every replica identical.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.to(target).eval()
