"""Build a job's parts from its config: model, task, datasets, compressors, fingerprint.

The driver and every worker call these same functions, so all replicas agree; the model's
state hash in the fingerprint catches any replica that does not.
"""

from __future__ import annotations

import json
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn

from grass_dist import compressor_state
from grass_dist.capture import resolve_layers
from grass_dist.compress import Compressor, build_compressors, learned_layers
from grass_dist.config import JobConfig
from grass_dist.data_identity import data_identity
from grass_dist.errors import ConfigError
from grass_dist.index import GradientIndex
from grass_dist.index.retry import RetryPolicy
from grass_dist.models import state_hash

FORMAT_VERSION = 1


def _instantiate(node: dict[str, Any], where: str) -> Any:
    try:
        return instantiate(node)
    except InstantiationException as e:
        raise ConfigError(
            f"could not build '{where}' from _target_={node.get('_target_')!r}: {e}. Check the "
            f"import path and the arguments under '{where}'."
        ) from e


def build_model(job: JobConfig) -> nn.Module:
    model = _instantiate(job.model, "model")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_ returned a {type(model).__name__}, not an nn.Module")
    return model


def build_task(job: JobConfig):
    return _instantiate(job.task, "task")


def build_dataset(job: JobConfig, which: str):
    node = job.data.get(which)
    if node is None:
        raise ConfigError(f"data.{which} is not configured; set data.{which}._target_")
    dataset = _instantiate(node, f"data.{which}")
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ConfigError(f"data.{which} must be a map-style dataset (__getitem__ and __len__)")
    return dataset


def store_retry(job: JobConfig) -> RetryPolicy:
    """The backoff policy every process of the job uses for the index store."""
    st = job.store
    return RetryPolicy(st.retries, st.backoff_s, st.backoff_max_s)


def build_layer_compressors(
    job: JobConfig, model: nn.Module, index: GradientIndex | None = None
) -> dict[str, Compressor]:
    """The compressors of the configured layers; learned ones load their state from `index`."""
    shapes = resolve_layers(model, job.index.layers)
    need = learned_layers(job.compression, shapes)
    states = compressor_state.load_states(index, need) if need and index is not None else {}
    return build_compressors(job.compression, shapes, states)


def driver_compressors(job: JobConfig, model: nn.Module, task, train) -> dict[str, Compressor]:
    """The driver's compressors: learned state comes from the existing index, else is fitted.

    Fitting runs only when no index exists yet; `compressor_state.save_states` then stores it.
    """
    shapes = resolve_layers(model, job.index.layers)
    need = learned_layers(job.compression, shapes)
    if not need:
        return build_compressors(job.compression, shapes)
    existing = compressor_state.open_existing(job.index_url, job.store.storage_options)
    if existing is not None:
        states = compressor_state.load_states(existing, need)
    else:
        states = compressor_state.fit_states(
            job.compression, model, task, train, shapes, need, job.index.batch_size
        )
    return build_compressors(job.compression, shapes, states)


def _canonical(node: Any) -> Any:
    return json.loads(json.dumps(node, sort_keys=True, default=str))


def fingerprint(
    job: JobConfig, model: nn.Module, compressors: dict[str, Compressor], task, train
) -> dict[str, Any]:
    """What an index's rows depend on; any difference makes the index incompatible.

    ``train`` is the built training set: its size arguments are left out of the data
    identity so that an index can grow (see ``grass_dist.data_identity``).
    """
    return {
        "format_version": FORMAT_VERSION,
        "model": {"target": job.model["_target_"], "state_sha256": state_hash(model)},
        "task": task.spec() if hasattr(task, "spec") else {"target": job.task["_target_"]},
        "compression": {"method": job.compression.method, "seed": job.compression.seed},
        "layers": [{"name": n, **c.spec()} for n, c in compressors.items()],
        "dtype": job.index.dtype,
        "data": {"train": _canonical(data_identity(job.data["train"], train))},
    }
