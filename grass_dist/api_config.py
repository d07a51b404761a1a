"""The Python API's arguments as a job config: objects, factories and config nodes become
the nodes of the jobs' config (`as_node`), `Index.build`'s arguments its fields
(`job_config`), and `overrides` are merged in as on a jobs command line (`with_overrides`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from grass_dist import assembly
from grass_dist.config_help import PRESETS
from grass_dist.errors import ConfigError

DEFAULT_TASK = {"_target_": "grass_dist.tasks.classification"}


# Modules kept at their old paths so that configs (and index fingerprints) keep their `_target_`.
_CONFIG_PATHS = {
    "grass_dist.models.tiny_lm": "grass_dist.tiny_lm",
    "grass_dist.models.hf": "grass_dist.hf",
    "grass_dist.tasks.language_model": "grass_dist.tasks_lm",
}


def _path(fn: Any, where: str = "a factory") -> str:
    """The config path of `fn`: its stable path where it has one (_CONFIG_PATHS), else the
    shortest import path, where a package that re-exports it wins over the module that
    defines it (grass_dist.data.digits, whose name the function shadows). ConfigError for
    what no worker can import by name: a lambda, a local function, a script's own."""
    name = f"{fn.__module__}.{fn.__qualname__}"
    what = None
    if fn.__module__ == "__main__":
        what = "defined in the script itself (__main__)"
    elif "<" in fn.__qualname__:
        what = "a lambda or a function defined inside another"
    if what:
        raise ConfigError(
            f"{where}: {name} is {what}, which Ray's worker processes cannot import by "
            f"name: pass the object it builds instead ({fn.__name__}(...)), or define it "
            f"at the top level of a module on the workers' PYTHONPATH"
        )
    stable = _CONFIG_PATHS.get(fn.__module__)
    if stable and getattr(importlib.import_module(stable), fn.__qualname__, None) is fn:
        return f"{stable}.{fn.__qualname__}"
    parts = fn.__module__.split(".")
    for i in range(1, len(parts) + 1):
        home = ".".join(parts[:i])
        try:
            if getattr(importlib.import_module(home), fn.__qualname__, None) is fn:
                return f"{home}.{fn.__qualname__}"
        except ImportError:
            continue
    return f"{fn.__module__}.{fn.__qualname__}"


def as_node(value: Any, where: str) -> dict[str, Any]:
    """A config node for `value`: a node with `_target_` as given, a factory (function,
    class, functools.partial) by import path and keywords, any other object in memory."""
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (str, bytes, os.PathLike)):
        raise ConfigError(
            f"{where} is the {type(value).__name__} {value!r}: give the object itself, a "
            f"factory (a function or class, or functools.partial of one), or a config node "
            f"such as {{'_target_': {str(value)!r}, ...}}"
        )
    if isinstance(value, dict):
        if "_target_" not in value:
            raise ConfigError(
                f"{where} is a dict without _target_: give a config node such as "
                f"{{'_target_': 'my_pkg.build', ...}}, a factory, or the object itself"
            )
        return dict(value)
    if isinstance(value, functools.partial):
        if value.args:
            raise ConfigError(
                f"{where}: functools.partial({_path(value.func, where)}, ...) has positional "
                f"arguments; pass them by keyword so the config can name them"
            )
        return {"_target_": _path(value.func, where), **value.keywords}
    if inspect.isfunction(value) or inspect.isclass(value):
        return {"_target_": _path(value, where)}
    try:
        return assembly.register(value)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def job_config(
    model: Any,
    train: Any,
    *,
    task: Any = None,
    compression: str = "factgrass",
    k: int | None = None,
    store: str | os.PathLike = "outputs/index",
    storage_options: dict[str, Any] | None = None,
    workers: int = 2,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """The job config of `Index.build`'s arguments; `overrides` are dotted `key=value`
    settings as on a jobs command line (e.g. "index.shard_size=64")."""
    raw: dict[str, Any] = {
        "model": as_node(model, "model"),
        "task": as_node(task, "task") if task is not None else dict(DEFAULT_TASK),
        "data": {"train": as_node(train, "data.train")},
        "compression": {**compression_preset(compression), **({"k": k} if k is not None else {})},
        "store": {"url": _url(store), "storage_options": dict(storage_options or {})},
        "cluster": {"num_workers": workers},
    }
    return with_overrides(raw, overrides)


def with_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`raw` with dotted `key=value` settings merged in, as on a jobs command line. A single
    string would be read as a list of its characters: refused, as is an item without `=`."""
    if isinstance(overrides, (str, bytes)) or not all(
        isinstance(o, str) and "=" in o for o in overrides
    ):
        example = overrides if isinstance(overrides, str) and "=" in overrides else "key=value"
        raise ConfigError(
            f"overrides={overrides!r}: give a list of 'key=value' strings, e.g. "
            f"overrides=[{example!r}]"
        )
    if not overrides:
        return raw
    merged = OmegaConf.merge(OmegaConf.create(raw), OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_container(merged, resolve=True)


# What Index.build takes by keyword: job_config's settings.
BUILD_SETTINGS = tuple(
    name for name, p in inspect.signature(job_config).parameters.items() if p.kind is p.KEYWORD_ONLY
)


# The jobs' config groups: `compression="identity"` is `compression=identity` on their command
# line, the preset's every field (identity also keeps non-Linear layers exact: other=identity).
def compression_preset(method: str) -> dict[str, Any]:
    """The compression node of `compression=<method>` on a jobs command line: the fields of
    conf/compression/<method>.yaml; {"method": method} for a method without a preset (the
    config check then accepts or refuses it)."""
    preset = PRESETS / "compression" / f"{method}.yaml" if isinstance(method, str) else None
    if preset is None or not preset.is_file():
        return {"method": method}
    return {**OmegaConf.to_container(OmegaConf.load(preset)), "method": method}


def _url(store: Any) -> str:
    if not isinstance(store, (str, os.PathLike)):
        raise ConfigError(
            f"store={store!r} is not a path or URL: give a string or a pathlib.Path, e.g. "
            "store='outputs/index' or store='s3://bucket/prefix'"
        )
    return os.fspath(store)
