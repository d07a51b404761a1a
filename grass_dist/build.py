"""Build a job's parts from its config: model, task, datasets, compressors, fingerprint.

The driver and every worker call these same functions, so all replicas agree; the model's
state hash in the fingerprint catches any replica that does not.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from torch import nn

from grass_dist import compress
from grass_dist.compress import Compressor, build_compressors, learned_layers
from grass_dist.config import JobConfig
from grass_dist.data.identity import data_identity
from grass_dist.errors import ConfigError, GrassError
from grass_dist.gradients import learned_state
from grass_dist.gradients.capture import resolve_layers
from grass_dist.gradients.computer import all_finite
from grass_dist.index import GradientIndex
from grass_dist.index.fingerprint import IN_MEMORY
from grass_dist.index.gradient_index import FORMAT_VERSION
from grass_dist.models.state import settings_hash, state_hash
from grass_dist.target_checks import (
    HYDRA_KEYS,
    UNSET,
    check_unset_arguments,
    unset_target,
)
from grass_dist.target_errors import unimportable

# Keys Hydra reads itself; everything else under a node is an argument of its _target_.
# Groups with a `custom` preset: a bare `_target_` for the user's own callable.
_CUSTOM_PRESETS = ("model", "data", "task")


def _preset(where: str) -> tuple[str | None, set[str] | None]:
    """The preset Hydra chose for `where`'s group (`group=option`) and the argument names
    under `where` set on the command line; (None, None) when Hydra did not compose the job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, None
    hydra = HydraConfig.get()
    group = where.split(".")[0]
    choice = hydra.runtime.choices.get(group)
    prefix = f"{where}."
    keys = (o.lstrip("~+").split("=", 1)[0] for o in hydra.overrides.task)
    user = {k[len(prefix) :].split(".")[0] for k in keys if k.startswith(prefix)}
    return (f"{group}={choice}" if choice else None), user


def _leftover_fix(where: str, given: list[str], extra: list[str]) -> str:
    """How to drop arguments the callable does not take, naming the preset they came from."""
    group = where.split(".")[0]
    if group not in _CUSTOM_PRESETS:
        return f"Remove them: {' '.join(f'~{where}.{k}' for k in extra)}"
    preset, user = _preset(where)
    # Every key the command line did not set came from the preset, accepted ones included:
    # the preset's `hidden` would reach a user's `hidden` too.
    held = extra if user is None else [k for k in given if k not in user]
    drop = [*held, *(k for k in extra if k not in held)]
    also = [k for k in held if k not in extra]
    source = f"the preset {preset}" if preset else "the selected preset"
    received = f" (also {', '.join(also)}, which it would receive)" if also else ""
    return (
        f"Arguments under {where} are passed to its _target_, and {source} holds those of its "
        f"own _target_{received}. Select {group}=custom (a _target_ and no arguments; add "
        f"yours with +{where}.<name>=...) or remove them: "
        f"{' '.join(f'~{where}.{k}' for k in drop)}"
    )


def locate_target(node: dict[str, Any], where: str) -> Callable[..., Any]:
    """The callable named by `node["_target_"]`; ConfigError when unset or not importable."""
    target = node.get("_target_")
    if target in (None, UNSET):
        raise unset_target(where)
    hydra_log = logging.getLogger("hydra.utils")  # logs the error it then raises
    hydra_log.addFilter(_silent)
    try:
        return get_object(str(target))
    except Exception as e:  # Hydra raises ImportError or a bare Exception for a bad path
        raise unimportable(str(target), where, e, _why(e)) from None
    finally:
        hydra_log.removeFilter(_silent)


def _silent(record: logging.LogRecord) -> bool:
    return False


def check_arguments(
    fn: Callable[..., Any], node: dict[str, Any], where: str, supplied: int = 0
) -> None:
    """Refuse, before calling `fn`, arguments under `where` that it does not take, and
    required ones that are missing. The first `supplied` parameters are passed by the
    caller (e.g. lds.train's dataset and seed), not by the config.

    A preset's arguments belong to the preset's own `_target_`: overriding only `_target_`
    keeps them, which is the usual cause of a leftover argument, so the message says how
    to drop them all (the `custom` preset) or one by one (`~key`).
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins and C extensions may have no signature
        return
    target = f"{where}._target_={node.get('_target_')}"
    given = [k for k in node if k not in HYDRA_KEYS]
    named = params[supplied:]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        takes = {p.name for p in named if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        extra = [k for k in given if k not in takes]
        if extra:
            raise ConfigError(
                f"{target} takes no argument {', '.join(extra)} (it takes: "
                f"{', '.join(sorted(takes)) or 'none'}). {_leftover_fix(where, given, extra)}"
            )
    check_unset_arguments(node, where)
    if node.get("_partial_") or node.get("_args_"):
        return
    missing = [
        p.name
        for p in named
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in node
    ]
    if missing:
        adds = " ".join(f"+{where}.{p}=<value>" for p in missing)
        raise ConfigError(f"{target} needs argument {', '.join(missing)}: add {adds}")


def _instantiate(node: dict[str, Any], where: str) -> Any:
    check_arguments(locate_target(node, where), node, where)
    try:
        return instantiate(node)
    except InstantiationException as e:
        if isinstance(e.__cause__, GrassError):  # the callable's own refusal says it best
            raise e.__cause__ from None
        raise ConfigError(
            f"could not build '{where}' from _target_={node.get('_target_')!r}: {_why(e)}. "
            f"{_fix(e, node, where)}"
        ) from e


def _fix(e: Exception, node: dict[str, Any], where: str) -> str:
    """What to check: the target (found, see `locate_target`) raised, so its arguments;
    else Hydra failed before the call (a nested _target_), so the import paths too."""
    if e.__cause__ is None:
        return f"Check the import paths and the arguments under '{where}'."
    named = [k for k in node if not k.startswith("_")]
    listed = f" ({', '.join(named)})" if named else ""
    return f"The call raised it: check the arguments under '{where}'{listed}."


def _why(e: Exception) -> str:
    """What went wrong under Hydra, in the cause's own words: Hydra's text gives the
    cause's repr, which drops what an OSError names (FileNotFoundError(2, '...'), not the
    path), over several lines."""
    cause = e.__cause__
    if cause is None:
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{type(cause).__name__}: {cause}".rstrip(": ")


def build_model(job: JobConfig) -> nn.Module:
    model = _instantiate(job.model, "model")
    if not isinstance(model, nn.Module) and job.model.get("_target_") == IN_MEMORY:
        swapped = hasattr(model, "__getitem__") and hasattr(model, "__len__")
        fix = "a dataset? Index.build takes the model first, then train" if swapped else None
        raise ConfigError(
            f"the model you passed is of type {type(model).__name__}, not a torch nn.Module: "
            f"{fix or 'pass the trained nn.Module to attribute (or a factory that builds it)'}"
        )
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model._target_={job.model['_target_']!r} returned an object of type "
            f"{type(model).__name__}, not a torch nn.Module; make it return the model to attribute"
        )
    check_weights(model, _named("model", job.model))
    return model


def check_weights(model: nn.Module, named: str) -> None:
    """ConfigError naming the first parameters with NaN or inf, and buffers with NaN, of
    `model` (called `named`): each of its losses and gradients would be NaN or inf, and the
    job would blame every row of the first batch as if the data were bad.

    Buffers may hold inf on purpose (an attention mask of -inf), NaN never (a batch norm's
    running variance after training diverged). One sum per tensor, as `all_finite`.
    """
    bad = [n for n, p in model.named_parameters() if not _finite(p, allow_inf=False)]
    bad += [f"{n} (buffer)" for n, b in model.named_buffers() if not _finite(b, allow_inf=True)]
    if not bad:
        return
    listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise ConfigError(
        f"{named} has NaN or inf weights in {listed}: every loss and gradient it gives would "
        f"be NaN or inf. Fix: load the checkpoint you mean to attribute (check the model's "
        f"path), or check whether its training diverged (a loss that went NaN)"
    )


def _finite(t: torch.Tensor, allow_inf: bool) -> bool:
    """Whether floating tensor `t` holds no NaN (and, unless `allow_inf`, no inf)."""
    if not t.is_floating_point() or t.is_meta:
        return True
    t = t.detach()
    if allow_inf:
        return not bool(torch.isnan(t).any())
    return all_finite(t)


# What every process calls on a task (grass_dist.gradients.computer); the rest is optional.
TASK_METHODS = ("collate", "to", "per_sample_loss")


def build_task(job: JobConfig):
    task = _instantiate(job.task, "task")
    missing = [m for m in TASK_METHODS if not callable(getattr(task, m, None))]
    if missing:
        raise ConfigError(
            f"task._target_={job.task['_target_']!r} returned an object of type "
            f"{type(task).__name__} without "
            f"{', '.join(missing)}; a task needs collate(items), to(batch, device) and "
            f"per_sample_loss(model, batch) (see grass_dist.tasks.classifier.ClassificationTask)"
        )
    return task


def build_dataset(job: JobConfig, which: str):
    node = job.data.get(which)
    if node is None:
        raise ConfigError(f"data.{which} is not configured; set data.{which}._target_")
    dataset = _instantiate(node, f"data.{which}")
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ConfigError(
            f"data.{which}._target_={node['_target_']!r} returned an object of type "
            f"{type(dataset).__name__}, not a map-style dataset (__getitem__ and __len__); "
            f"return e.g. a list or a torch TensorDataset"
        )
    if len(dataset) == 0:
        if node.get("_target_") == IN_MEMORY:
            named = _named("training set" if which == "train" else f"{which} set", node)
            raise ConfigError(f"{named} is empty (0 rows)")
        raise ConfigError(
            f"data.{which}._target_={node['_target_']!r} built an empty dataset (0 rows); "
            f"check the arguments under data.{which} (its size, split or path)"
        )
    return dataset


def _named(part: str, node: dict[str, Any]) -> str:
    """How messages name the model or task: its config target, or the type of the object
    given in memory (the API)."""
    if node.get("_target_") == IN_MEMORY:
        return f"the {part} you passed (a {node.get('type')})"
    return f"{part}._target_={node.get('_target_')!r}"


def check_keys(dataset, which: str) -> None:
    """A dataset's `keys` (grass_dist.data.items.sample_key), if it has them, name each row
    once: one per row and no two alike, or results would name rows wrongly (or a worker
    fail on a row without a key)."""
    keys = getattr(dataset, "keys", None)
    if keys is None or callable(keys):  # no keys (rows go by number), or a dict's keys()
        return
    fix = (
        "give one distinct key per row, in row order, or no `keys` attribute (rows are "
        "then keyed by number)"
    )
    try:
        n = len(keys)
    except TypeError:
        raise ConfigError(
            f"data.{which}'s `keys` attribute is a {type(keys).__name__}, not a sequence: {fix}"
        ) from None
    if n != len(dataset):
        raise ConfigError(f"data.{which} has {len(dataset)} rows but {n} keys: {fix}")
    first: dict[str, int] = {}
    for row, key in enumerate(keys):
        if first.setdefault(str(key), row) != row:
            raise ConfigError(
                f"data.{which}'s keys are not distinct: rows {first[str(key)]} and {row} both "
                f"have key {str(key)!r} (results name training rows by key): {fix}"
            )


def check_rows(job: JobConfig, model: nn.Module, task, dataset, which: str) -> None:
    """Row 0 of data.<which> through the task and the model, forward only (no gradient):
    items the task cannot collate, or the model cannot take, fail here with the fields to
    check instead of inside a worker after Ray started."""
    check_keys(dataset, which)
    if hasattr(task, "check_data"):
        task.check_data(model, dataset, which)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    training = model.training
    model.eval()  # eval: a forward in train mode could update buffers (batch-norm statistics)
    try:
        with torch.no_grad():
            losses = task.per_sample_loss(model, task.to(task.collate([dataset[0]]), device))
    except ConfigError as e:  # the task's own words: which row they are about
        raise ConfigError(f"row 0 of data.{which}: {e}") from None
    except GrassError:
        raise
    except Exception as e:
        raise ConfigError(
            f"row 0 of data.{which} does not fit {_named('task', job.task)} and "
            f"{_named('model', job.model)}: {type(e).__name__}: {str(e).rstrip('.')}. Check that "
            f"data.{which} returns the items the task collates and the model takes"
        ) from None
    finally:
        model.train(training)
    shape = tuple(getattr(losses, "shape", ()))
    if shape != (1,):
        raise ConfigError(
            f"{_named('task', job.task)}: per_sample_loss returned shape {shape} "
            f"for one row of data.{which}; it must return one loss per row, shape (B,)"
        )


def check_compressors(job: JobConfig, model: nn.Module) -> list[str]:
    """Refuse the layers and compression settings before anything is written or computed;
    returns the layers kept whole by compression.whole_small_layers."""
    shapes = resolve_layers(model, job.index.layers)
    compress.check_compressors(job.compression, shapes)
    return compress.whole_layers(job.compression, shapes)


def build_layer_compressors(
    job: JobConfig, model: nn.Module, index: GradientIndex | None = None
) -> dict[str, Compressor]:
    """The compressors of the configured layers (with index.layers=null, those of `index`,
    which the driver chose by running the model: `capture.layers_that_run`); learned ones
    load their state from `index`."""
    names = job.index.layers
    if names is None and index is not None:
        names = [name for name, _ in index.layers]
    shapes = resolve_layers(model, names)
    need = learned_layers(job.compression, shapes)
    states = learned_state.load_states(index, need) if need and index is not None else {}
    return build_compressors(job.compression, shapes, states)


def _canonical(node: Any) -> Any:
    return json.loads(json.dumps(node, sort_keys=True, default=str))


def _task_identity(node: dict[str, Any]) -> dict[str, Any]:
    """A task without `spec()`: its target and arguments (an object given in memory: its
    sha256 and type), so that another loss is another index."""
    args = {k: v for k, v in node.items() if k != "_target_"}
    return {"target": node["_target_"], **_canonical(args)}


def fingerprint(
    job: JobConfig, model: nn.Module, compressors: dict[str, Compressor], task, train
) -> dict[str, Any]:
    """What an index's rows depend on; any difference makes the index incompatible.

    ``train`` is the built training set: its size arguments are left out of the data
    identity so that an index can grow (see ``grass_dist.data.identity``). A task is known
    by its ``spec()`` or else by its config node. A layer kept
    whole by compression.whole_small_layers is recorded in ``layers`` as method identity,
    so turning the switch off (where it kept a layer whole) makes the index incompatible.
    """
    return {
        "format_version": FORMAT_VERSION,
        "model": {
            "target": job.model["_target_"],
            "state_sha256": state_hash(model),
            "settings_sha256": settings_hash(model),
        },
        "task": task.spec() if hasattr(task, "spec") else _task_identity(job.task),
        "compression": {"method": job.compression.method, "seed": job.compression.seed},
        "layers": [{"name": n, **c.spec()} for n, c in compressors.items()],
        "dtype": job.index.dtype,
        "data": {"train": _canonical(_train_identity(job.data["train"], train))},
    }


def _train_identity(node: dict[str, Any], train) -> dict[str, Any]:
    """data.train's part of the fingerprint (`data_identity`). An in-memory dataset (Python
    API) is known there by its type alone, not its content's digest: its rows are checked
    one by one against the index (`check_committed_content`), so that, like a file, it can
    grow, and a changed row is named."""
    if node.get("_target_") == IN_MEMORY:
        node = {key: value for key, value in node.items() if key != "sha256"}
    return data_identity(node, train)
