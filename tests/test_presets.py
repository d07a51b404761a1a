"""The config dataclasses are the one source of every default; presets set only what differs.

`register_configs` makes `JobConfig` the base conf/config.yaml is merged onto, so a preset
that restates a default is a second copy of it that can silently drift. Each YAML file is
read as written (its own keys, not the composed result) and compared with the defaults.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest
from hydra.utils import get_object
from omegaconf import OmegaConf

from grass_dist.config import JobConfig
from tests.conftest import CONF

# model, data and task are the user's callables, not dataclasses: their presets hold the
# callable's arguments (checked against our own callables below).
CALLABLES = ("model", "data", "task")
GROUPS = [f.name for f in dataclasses.fields(JobConfig) if f.name not in CALLABLES]
DEFAULTS = {g: OmegaConf.to_container(OmegaConf.structured(JobConfig))[g] for g in GROUPS}
YAMLS = sorted(CONF.rglob("*.yaml"))


def restated(preset: dict[str, Any], defaults: dict[str, Any], where: str) -> list[str]:
    """`where.key=value` for every key of `preset` whose value is its default."""
    found = []
    for key, value in preset.items():
        if key not in defaults:  # a new key of a dict field (store.storage_options.anon)
            continue
        default = defaults[key]
        if isinstance(value, dict) and isinstance(default, dict) and value and default:
            found += restated(value, default, f"{where}.{key}")
        elif value == default and type(value) is type(default):
            found.append(f"{where}.{key}={value!r}")
    return found


def _groups_in(path: Path) -> dict[str, Any]:
    """{group: its node} of a YAML file, as the file itself writes it."""
    node = OmegaConf.to_container(OmegaConf.load(path)) or {}
    node.pop("defaults", None)
    top_level = path == CONF / "config.yaml" or "@package _global_" in path.read_text()
    if top_level:
        return {g: v for g, v in node.items() if g in GROUPS}
    group = path.parent.name
    return {group: node} if group in GROUPS else {}


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(CONF)) for p in YAMLS])
def test_preset_sets_only_what_differs_from_the_dataclasses(path):
    found = [r for g, node in _groups_in(path).items() for r in restated(node, DEFAULTS[g], g)]
    assert not found, (
        f"conf/{path.relative_to(CONF)} restates defaults of grass_dist/config.py: {found}. "
        f"Delete these keys from the YAML (or change the dataclass default if the value "
        f"every user gets should change)"
    )


def test_a_restated_default_is_found():
    preset = {"method": "grass", "k": 256, "selective": {"lr": 0.02, "epochs": 10}}
    assert restated(preset, DEFAULTS["compression"], "compression") == [
        "compression.k=256",
        "compression.selective.lr=0.02",
    ]


# Our own model callables: `tiny_gpt2()` in Python and `model=tiny_gpt2` must build (and
# cache, under a hash of the arguments) the same model.
OWN_MODELS = sorted((CONF / "model").glob("digits_*.yaml")) + [CONF / "model" / "tiny_gpt2.yaml"]


@pytest.mark.parametrize("path", OWN_MODELS, ids=[p.stem for p in OWN_MODELS])
def test_own_model_preset_agrees_with_its_callable(path):
    node = OmegaConf.to_container(OmegaConf.load(path))
    params = inspect.signature(get_object(node["_target_"])).parameters
    literal = {k: v for k, v in node.items() if k != "_target_" and "${" not in str(v)}
    differ = {k: (v, params[k].default) for k, v in literal.items() if v != params[k].default}
    assert not differ, f"conf/model/{path.name}: preset value vs callable default {differ}"
