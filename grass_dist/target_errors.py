"""Why a config's `_target_` cannot be imported, in words that name the fix: a module that
imports but lacks the name (with the near names it has), a package its code imports that
is not installed, or a path that is not there at all."""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType
from typing import Any

from grass_dist.errors import ConfigError


def unimportable(target: str, where: str, e: Exception, why: str) -> ConfigError:
    """The refusal of `<where>._target_=target`, whose import raised `e` (`why`: its cause in
    words)."""
    missing = _missing_attribute(target)
    if missing is not None:
        return _no_attribute(target, where, *missing)
    needed = _missing_dependency(target, e)
    if needed is not None:
        return ConfigError(
            f"{where}._target_={target!r} cannot be imported: its code imports {needed!r}, "
            f"which is not installed in this environment ({why}); install it (e.g. "
            f"pip install {needed.split('.')[0]}) where the job runs, on every node"
        )
    return ConfigError(
        f"{where}._target_={target!r} cannot be imported ({why}); check the import path "
        f"and that its package is on PYTHONPATH of every node"
    )


def _missing_attribute(target: str) -> tuple[str, ModuleType, str, str] | None:
    """(`owner`, its module, `name`, the rest) when `target` is `owner.name[.rest]`, `owner`
    a module that imports and has no attribute `name` (nor, for a package, a submodule `name`
    that would end `target`); None otherwise, e.g. a module that is not there or fails to
    import, whose reason Hydra's error gives."""
    parts = target.split(".")
    try:
        obj: Any = importlib.import_module(parts[0])
    except Exception:
        return None
    for i, part in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, part)
            continue
        except AttributeError:
            pass
        except Exception:
            return None
        if not isinstance(obj, ModuleType):
            return None
        owner, rest = ".".join(parts[:i]), ".".join(parts[i + 1 :])
        if hasattr(obj, "__path__"):  # a package: `part` may be a submodule
            try:
                obj = importlib.import_module(f"{owner}.{part}")
                continue
            except ModuleNotFoundError as e:
                # A missing submodule within the path, or a module that imports a missing
                # one: Hydra's reason says which.
                if e.name != f"{owner}.{part}" or rest:
                    return None
            except Exception:
                return None
        return owner, obj, part, rest
    return None


def _missing_dependency(target: str, e: Exception) -> str | None:
    """The module that `target`'s own code imports and that is not installed (the module
    not found is not `target` itself nor a package on its path); None otherwise."""
    cause = e.__cause__
    gone = getattr(cause, "name", None) if isinstance(cause, ModuleNotFoundError) else None
    parts = target.split(".")
    if gone is None or gone in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
        return None
    return gone


def _no_attribute(
    target: str, where: str, owner: str, module: ModuleType, name: str, rest: str
) -> ConfigError:
    """The module exists and imports but has no `name`: the near names it has instead
    (callables to end the path, modules and classes within it)."""
    names = {}
    for n in dir(module):
        value = getattr(module, n, None)
        fits = isinstance(value, (ModuleType, type)) if rest else callable(value)
        if fits and not n.startswith("_") and (rest or not isinstance(value, ModuleType)):
            names[n] = value
    said = f"{where}._target_={target!r} cannot be imported: module {owner} has no attribute {name}"
    near = difflib.get_close_matches(name, list(names), n=3)
    if near:
        path = ".".join(p for p in (owner, near[0], rest) if p)
        return ConfigError(
            f"{said} (did you mean {' or '.join(near)}?); fix the name, e.g. "
            f"{where}._target_={path}"
        )
    if rest:
        return ConfigError(f"{said}; check the import path in {where}._target_")
    exported = getattr(module, "__all__", None)
    own = sorted(
        n
        for n, v in names.items()
        if (
            n in exported
            if isinstance(exported, (list, tuple))
            else getattr(v, "__module__", None) == owner
        )
    )
    if not own:
        return ConfigError(
            f"{said} (it defines no public callable); check {where}._target_, or define "
            f"{name} in {owner}"
        )
    listed = ", ".join(own[:10]) + (f" and {len(own) - 10} more" if len(own) > 10 else "")
    return ConfigError(
        f"{said} (its callables: {listed}); set {where}._target_ to one of them, or define "
        f"{name} in {owner}"
    )
