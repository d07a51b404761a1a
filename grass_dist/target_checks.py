"""Whether the `_target_` nodes a job builds are given: the model, task and data callables
that a preset (model=custom, data=custom, data=text_files) leaves `???`, refused before Ray
starts for the job. Imports no torch, like `config_checks`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from grass_dist.errors import ConfigError

if TYPE_CHECKING:
    from grass_dist.config import JobConfig

# Hydra's own keys of a `_target_` node, and the value of a mandatory one not yet given.
HYDRA_KEYS = frozenset({"_target_", "_args_", "_recursive_", "_convert_", "_partial_"})
UNSET = "???"


def unset_target(where: str) -> ConfigError:
    return ConfigError(
        f"{where}._target_ is not set: give the import path of your callable, e.g. "
        f"{where}._target_=my_pkg.module.build"
    )


def check_targets_set(job: JobConfig, query: bool) -> None:
    """Refuse a `_target_` the job builds (the queries' only when it scores them) that its
    preset leaves unset (model=custom, data=custom), before Ray starts for the job."""
    nodes = [(job.model, "model"), (job.task, "task"), (job.data.get("train"), "data.train")]
    if query:
        nodes.append((job.data.get("query"), "data.query"))
    for node, where in nodes:
        if isinstance(node, dict) and node.get("_target_") == UNSET:
            raise unset_target(where)
        if isinstance(node, dict):
            check_unset_arguments(node, where)


def check_unset_arguments(node: dict[str, Any], where: str) -> None:
    """Refuse a preset's `???` arguments still unset (data=text_files' paths), which would
    otherwise reach the callable as text."""
    unset = unset_fields(node)
    if unset:
        adds = " ".join(f"{where}.{k}=<value>" for k in unset)
        raise ConfigError(
            f"{where}._target_={node.get('_target_')} needs {', '.join(unset)}, which the "
            f"preset leaves unset: add {adds}"
        )


def unset_fields(node) -> list[str]:
    """Keys of a `_target_` node that its preset leaves `???` (mandatory, not yet given):
    its arguments, and `_target_` itself (data=custom's)."""
    return [
        k
        for k in node
        if (k == "_target_" or k not in HYDRA_KEYS)
        and isinstance(node[k], str)
        and node[k] == UNSET
    ]
