"""One assembly of a job's parts: store, index, model, task, compressors.

The driver (grass_dist.pipeline), every GradientWorker, the reducer and the query service
obtain their parts here, so every process opens the store with the job's retry policy
(store.retries, backoff_s, backoff_max_s) and builds the same model, task and compressors.

In-memory objects (grass_dist.api): a model, task or dataset given as an object is named in
the config by its content, `{_target_: grass_dist.assembly.in_memory, sha256, type}`, and
kept in this process's registry. `ship` puts every such object into Ray's object store once
per worker pool and `receive` registers them in a worker, so `build_model` / `build_dataset`
resolve the same node to the same object everywhere; the sha256 enters the fingerprint
through the node (data identity) and the model's state hash.
"""

from __future__ import annotations

import copy
import hashlib
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from grass_dist.build import IN_MEMORY, build_layer_compressors, build_model, build_task
from grass_dist.compress import Compressor, build_compressors, learned_layers
from grass_dist.config import JobConfig, StoreConfig
from grass_dist.errors import ConfigError
from grass_dist.gradients.capture import resolve_layers
from grass_dist.gradients.learned_state import fit_states, load_states
from grass_dist.index import GradientIndex, Store
from grass_dist.index.gradient_index import INDEX_FILE
from grass_dist.index.retry import RetryPolicy
from grass_dist.models.state import settings_hash, state_hash

# sha256 -> object, filled by `register` (driver) and `receive` (workers).
_OBJECTS: dict[str, Any] = {}


# ---- the store ------------------------------------------------------------------------------
def retry_policy(store: StoreConfig) -> RetryPolicy:
    """The backoff policy every process of the job uses for the index store."""
    return RetryPolicy(store.retries, store.backoff_s, store.backoff_max_s)


def open_store(job: JobConfig, url: str | None = None) -> Store:
    """The store at `url` (default: the job's index URL) with the job's options and retries."""
    return Store(url or job.index_url, job.store.storage_options, retry_policy(job.store))


def open_index(job: JobConfig) -> GradientIndex:
    """The job's existing index (IndexNotFoundError when there is none)."""
    return GradientIndex.open(job.index_url, job.store.storage_options, retry_policy(job.store))


def existing_index(job: JobConfig) -> GradientIndex | None:
    """The job's index, or None when none exists yet."""
    return open_index(job) if open_store(job).exists(INDEX_FILE) else None


def checked_index(job: JobConfig, fingerprint: dict[str, Any]) -> GradientIndex:
    """The job's index, created with `fingerprint` if absent; FingerprintMismatchError if the
    existing one was built with another."""
    return GradientIndex.create_or_open(
        job.index_url, fingerprint, job.store.storage_options, retry_policy(job.store)
    )


# ---- model, task, compressors -----------------------------------------------------------------
@dataclass
class Replica:
    """What computes phi: the model, the task and one compressor per attributed layer."""

    model: nn.Module
    task: Any
    compressors: dict[str, Compressor]


def replica(job: JobConfig, index: GradientIndex) -> Replica:
    """A model replica for a worker or the service; learned compressor state comes from
    `index`, so every replica uses the masks the index was built with."""
    model = build_model(job)
    return Replica(model, build_task(job), build_layer_compressors(job, model, index))


def driver_compressors(job: JobConfig, model: nn.Module, task, train) -> dict[str, Compressor]:
    """The driver's compressors: learned state comes from the existing index, else is fitted
    on `train` (`learned_state.save_states` then stores it before the index is created)."""
    shapes = resolve_layers(model, job.index.layers)
    need = learned_layers(job.compression, shapes)
    if not need:
        return build_compressors(job.compression, shapes)
    existing = existing_index(job)
    if existing is not None:
        states = load_states(existing, need)
    else:
        states = fit_states(job.compression, model, task, train, shapes, need, job.index.batch_size)
    return build_compressors(job.compression, shapes, states)


# ---- in-memory objects ------------------------------------------------------------------------
def _feed(h: Any, value: Any) -> None:
    """Hash `value` by content: tensors and arrays by dtype, shape and bytes."""
    if torch.is_tensor(value):
        value = value.detach().cpu().contiguous()
        h.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        h.update(f"A{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (tuple, list)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _feed(h, v)
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for k in sorted(value, key=str):
            _feed(h, str(k))
            _feed(h, value[k])
    elif value is None or isinstance(value, (str, int, float, bool, np.generic)):
        h.update(f"S{type(value).__name__}:{value!r}".encode())
    else:
        h.update(pickle.dumps(value, protocol=5))


def content_digest(obj: Any) -> str:
    """sha256 of what `obj` computes with: a model's state and settings (`settings_hash`),
    a dataset's rows (every one, in order), anything else's pickle."""
    if isinstance(obj, nn.Module):
        ident = f"{type(obj).__qualname__}:{state_hash(obj)}:{settings_hash(obj)}"
        return hashlib.sha256(ident.encode()).hexdigest()
    h = hashlib.sha256()
    if hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        n = len(obj)
        h.update(f"rows{n}".encode())
        for i in range(n):
            _feed(h, _row(obj, i, n))
    else:
        _feed(h, obj)
    return h.hexdigest()


def _row(dataset: Any, i: int, n: int) -> Any:
    """`dataset[i]`, or a ConfigError saying that a map-style dataset of `n` rows returns
    one for every i < n."""
    try:
        return dataset[i]
    except Exception as e:  # noqa: BLE001 -- whatever the dataset's own __getitem__ raises
        kind = type(dataset).__name__
        hint = (
            " (a pandas DataFrame is indexed by column: pass its rows, e.g. a TensorDataset "
            "of its columns as tensors)"
            if kind == "DataFrame"
            else ""
        )
        raise ConfigError(
            f"row {i} of the {kind} you passed could not be read ({type(e).__name__}: {e}): "
            f"it says it has {n} rows (len), so [0] .. [{n - 1}] must each return a row"
            f"{hint}"
        ) from None


def register(obj: Any) -> dict[str, Any]:
    """Keep `obj` in this process and return the config node that names it by content.

    A model is kept as a copy: computing gradients sets its mode and device, and the
    caller's model stays as the caller left it.
    """
    kind = type(obj)
    name = f"{kind.__module__}.{kind.__name__}"
    if isinstance(obj, Iterator):
        raise ConfigError(
            f"the {name} you passed is an iterator (a generator?), which can be read once and "
            f"has no length: give a list of its items (list(...)) or a map-style dataset "
            f"(__getitem__ and __len__)"
        )
    digest = content_digest(obj)
    try:
        _OBJECTS[digest] = copy.deepcopy(obj) if isinstance(obj, nn.Module) else obj
    except Exception as e:  # noqa: BLE001 -- whatever the object's own state raises
        raise _unpicklable(name, e) from None
    return {"_target_": IN_MEMORY, "sha256": digest, "type": name}


def _unpicklable(name: str, e: Exception) -> ConfigError:
    return ConfigError(
        f"the {name} you passed cannot be copied or pickled ({type(e).__name__}: {e}): "
        f"grass_dist keeps a copy of a model and sends every object to Ray's workers "
        f"pickled. Remove what cannot be pickled from it (a lock, an open file, a "
        f"generator), or pass a factory that builds it on the workers"
    )


def in_memory(sha256: str, type: str) -> Any:  # noqa: A002 -- the node's field name
    """Hydra target of a registered object: the object itself."""
    try:
        return _OBJECTS[sha256]
    except KeyError:
        raise ConfigError(
            f"the in-memory {type} with sha256 {sha256[:12]} is not in this process: objects "
            f"given to grass_dist.api live only in that Python process and the workers it "
            f"starts. For jobs or the service, name a factory instead (_target_=my_pkg.build)"
        ) from None


def _in_memory_nodes(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        if node.get("_target_") == IN_MEMORY:
            return [node]
        return [n for v in node.values() for n in _in_memory_nodes(v)]
    if isinstance(node, list):
        return [n for v in node for n in _in_memory_nodes(v)]
    return []


def ship(raw: dict[str, Any]) -> dict[str, Any]:
    """Every in-memory object `raw` names, put into Ray's object store: {sha256: ObjectRef}.

    Refs nested in a dict are not resolved by Ray on the way in, so each worker fetches an
    object once, in `receive`, rather than every actor argument being inlined.
    """
    import ray

    refs = {}
    for digest in sorted(in_memory_digests(raw)):
        obj = in_memory(digest, "object")
        try:
            refs[digest] = ray.put(shippable(obj))
        except Exception as e:  # noqa: BLE001 -- whatever pickling the object raises
            kind = type(obj)
            raise _unpicklable(f"{kind.__module__}.{kind.__name__}", e) from None
    return refs


def shippable(value: Any) -> Any:
    """`value` (lists, tuples and dicts of rows), with each tensor that views a larger
    storage copied out of it. Pickled, a view carries its whole storage: a list of rows
    `[(x[i], y[i]) for i in ...]` would carry `x` once per row, quadratic in its length."""
    if torch.is_tensor(value):
        own = value.numel() * value.element_size()
        if value.layout == torch.strided and value.untyped_storage().nbytes() > own:
            return value.clone(memory_format=torch.contiguous_format)
        return value
    if isinstance(value, list):
        return [shippable(v) for v in value]
    if isinstance(value, tuple):
        items = [shippable(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict) and type(value) is dict:
        return {k: shippable(v) for k, v in value.items()}
    return value


def in_memory_digests(raw: dict[str, Any]) -> set[str]:
    """The sha256 of every in-memory object the job `raw` names (model, task, data)."""
    return {
        n["sha256"] for part in ("model", "task", "data") for n in _in_memory_nodes(raw.get(part))
    }


def receive(objects: dict[str, Any] | None) -> None:
    """Register the objects `ship` sent (ObjectRefs, or the objects themselves outside Ray)."""
    if not objects:
        return
    import ray

    for digest, ref in objects.items():
        _OBJECTS[digest] = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
