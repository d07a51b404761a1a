"""What the settings are, for the messages that refuse a config: every dotted setting of
`JobConfig` (`settings`), the ones a mistyped key probably meant (`near_settings`), and one
setting's kind, default and help (`setting_help`).

Read from the dataclasses of grass_dist.config, so a new field is known here at once; that
module imports this one only where it refuses a config.
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from omegaconf.errors import OmegaConfBaseException

from grass_dist.config import JobConfig


def merge_error(group: str, e: OmegaConfBaseException) -> str:
    """One line naming the field, from OmegaConf's multi-line message."""
    reason = str(getattr(e, "msg", None) or e).splitlines()[0]
    key = getattr(e, "full_key", None)
    field_name = f"{group}.{key}" if key else group
    meant = "" if field_name in settings() else did_you_mean(field_name, "; {}")
    return (
        f"config group '{group}': {reason} (field {field_name}{meant}). "
        f"Fix: use the fields of "
        f"'{group}' that grass_dist/config.py lists (each with its help), with values of "
        "their type; new keys are not accepted"
    )


@functools.cache
def settings(schema: type = JobConfig, prefix: str = "") -> dict[str, bool]:
    """Every setting of `schema` by its dotted name (nested groups' fields included), True
    where it holds free-form keys (model, data, task, a dict such as store.storage_options,
    an Any such as lds.train), where `+name.key=value` adds one."""
    hints = get_type_hints(schema)
    names: dict[str, bool] = {}
    for f in fields(schema):
        hint, name = hints[f.name], prefix + f.name
        if is_dataclass(hint):
            names.update(settings(hint, name + "."))
        else:
            names[name] = hint is Any or getattr(hint, "__origin__", None) is dict
    return names


# The presets: one folder per group (conf/compression/grass.yaml is compression=grass).
PRESETS = Path(__file__).resolve().parents[1] / "conf"


def preset_groups() -> list[str]:
    """The preset groups, the folders of conf/."""
    return sorted(p.name for p in PRESETS.iterdir() if p.is_dir())


def near_settings(key: str) -> list[str]:
    """The settings a dotted `key` that is none probably meant: near in spelling, or with
    the same last part (a field named without its group), at most three."""
    names = settings()
    leaf = key.rsplit(".", 1)[-1]
    near = difflib.get_close_matches(key, names, n=3, cutoff=0.8)
    near += [n for n in names if n.rsplit(".", 1)[-1] == leaf and n not in near]
    return near[:3]


def did_you_mean(key: str, form: str) -> str:
    """`form` around 'did you mean ...?' for the settings near `key`; '' for none."""
    near = near_settings(key)
    return form.format(f"did you mean {' or '.join(near)}?") if near else ""


def unknown_setting(key: str, value: str | None = None) -> str | None:
    """What to do about a dotted `key` that the command line could not override: None when
    it lies under a free-form setting (`+key=value` adds it, as Hydra says), else a line
    saying it is no setting, what was probably meant, and that `+` would not add it."""
    names = settings()
    parts = key.split(".")
    if any(names.get(".".join(parts[:i])) for i in range(1, len(parts) + 1)):
        return None
    return f"{not_a_setting(key, value)}, and `+{key}=...` would be refused too: {SETTINGS_ARE}"


SETTINGS_ARE = "the settings are the fields of grass_dist/config.py, each with its help"

_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def setting_help(key: str, schema: type = JobConfig) -> str:
    """'<key> takes <the kind of value> (default <default>): <its help>' for a dotted
    setting `key`; for none, where the settings are."""
    *groups, leaf = key.split(".")
    for group in groups:
        schema = get_type_hints(schema).get(group) if is_dataclass(schema) else None
        if schema is None or not is_dataclass(schema):
            return SETTINGS_ARE
    found = {f.name: f for f in fields(schema)}.get(leaf)
    hint = get_type_hints(schema)[leaf] if found is not None else None
    if hint is None or is_dataclass(hint):
        return SETTINGS_ARE
    origin, args = get_origin(hint), get_args(hint)
    inner = [a for a in args if a is not type(None)]
    if origin in (Union, UnionType) and len(inner) == 1 and get_origin(inner[0]):
        origin, args = get_origin(inner[0]), get_args(inner[0])  # list[str] | None
    if origin is dict:
        kind = f"keys and values (+{key}.NAME=VALUE adds one)"
    elif origin is list:
        kind = "a list, e.g. [a,b]" if args == (str,) else "a list, e.g. [1,2]"
    else:  # a type, or an optional one
        kind = _KINDS.get(hint) or next((_KINDS[a] for a in args if a in _KINDS), "a value")
    if found.default_factory is not MISSING:
        kind += f" (default {json.dumps(found.default_factory(), default=str)})"
    elif found.default is not MISSING:
        kind += f" (default {json.dumps(found.default, default=str)})"
    said = found.metadata.get("help")
    return f"{key} takes {kind}" + (f": {said}" if said else "")


def not_a_setting(key: str, value: str | None = None) -> str:
    """'<key> is not a setting of grass_dist', with the settings it probably meant; for a
    misspelt preset group (`compresion=grass`, given `value`), the group."""
    group = difflib.get_close_matches(key, preset_groups(), 1) if "." not in key else []
    if group:
        return (
            f"{key} is neither a setting nor a preset group (did you mean {group[0]}="
            f"{value or '...'}? the groups are the folders of conf/: {', '.join(preset_groups())})"
        )
    return f"{key} is not a setting of grass_dist{did_you_mean(key, ' ({})')}"
