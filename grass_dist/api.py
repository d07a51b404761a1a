"""The Python API: build a gradient index and attribute queries from Python objects.

    import grass_dist as gd
    index = gd.Index.build(model, train_ds, store="outputs/api_index", k=1024, workers=4)
    result = index.attribute(query_ds, damping="auto", topk=10, dense=True)
    result.topk()   # pandas DataFrame: per query its top proponents and opponents
    result.dense()  # np.ndarray (n_train, n_query)

The same engine as `python -m jobs.attribute`: the arguments become a job config (every
field not given keeps the default of grass_dist.config), and the pipeline's stages run on
it, so the index format, fingerprint checks, resume and results are the jobs'. Model, task
and datasets may be objects in memory (an nn.Module with its weights, any map-style
dataset), factories (a function or class, or functools.partial of one) or config nodes
with `_target_`. Objects are named by their content (grass_dist.assembly.register) and reach
the workers through Ray's object store. A Ray the caller connected (`ray.init(address=...)`)
is used; otherwise an embedded one starts on first use.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import inspect
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import ray
from omegaconf import DictConfig, OmegaConf
from ray.exceptions import RayTaskError

from grass_dist import assembly, pipeline
from grass_dist.config import JobConfig, resolve
from grass_dist.config_help import PRESETS
from grass_dist.errors import ConfigError, GrassError, ResultsNotFoundError
from grass_dist.index import GradientIndex
from grass_dist.runtime import cluster, local_shard
from grass_dist.runtime.reducer_handle import KeptReducer
from grass_dist.scoring import results
from grass_dist.summary import job_summary

DEFAULT_TASK = {"_target_": "grass_dist.tasks.classification"}
# The jobs' config groups: `compression="identity"` is `compression=identity` on their command
# line, the preset's every field (identity also keeps non-Linear layers exact: other=identity).


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
_BUILD_SETTINGS = tuple(
    name for name, p in inspect.signature(job_config).parameters.items() if p.kind is p.KEYWORD_ONLY
)


def compression_preset(method: str) -> dict[str, Any]:
    """The compression node of `compression=<method>` on a jobs command line: the fields of
    conf/compression/<method>.yaml; {"method": method} for a method without a preset (the
    config check then accepts or refuses it)."""
    preset = PRESETS / "compression" / f"{method}.yaml" if isinstance(method, str) else None
    if preset is None or not preset.is_file():
        return {"method": method}
    return {**OmegaConf.to_container(OmegaConf.load(preset)), "method": method}


# The config key each argument of Index.build and Index.attribute sets: an error names the
# key (as the jobs' command lines do), and the API adds the argument's name.
_ARGUMENTS = {
    "cluster.num_workers": "workers",
    "compression.method": "compression",
    "compression.k": "k",
    "store.url": "store",
    "store.storage_options": "storage_options",
    "data.train": "train",
    "data.query": "query",
    "precondition.damping": "damping",
    "scoring.kind": "kind",
    "scoring.topk": "topk",
    "scoring.dense": "dense",
    "run.name": "name",
}


def _with_arguments(e: GrassError) -> GrassError:
    """`e`, its message followed by the arguments that set the config keys it names."""
    text = e.args[0] if e.args and isinstance(e.args[0], str) else None
    if text is None:
        return e
    named = [
        f"{arg}= sets {key}"
        for key, arg in _ARGUMENTS.items()
        if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", text)
    ]
    if named:
        e.args = (f"{text}\n(in the Python API: {'; '.join(named)})", *e.args[1:])
    return e


@contextmanager
def _own_errors() -> Iterator[None]:
    """A GrassError raised in a Ray worker, raised here as itself: Ray wraps it in a
    RayTaskError whose text is the worker's traceback (the jobs print the cause too), twice
    when a Ray task of a Ray actor raised it. One that names config keys also names the
    arguments that set them."""
    try:
        yield
    except RayTaskError as e:
        cause = e
        while isinstance(cause, RayTaskError) and getattr(cause, "cause", None) is not None:
            cause = cause.cause
        if isinstance(cause, GrassError):
            raise _with_arguments(cause) from None
        raise
    except GrassError as e:
        _with_arguments(e)
        raise


@contextmanager
def _ray_when_needed(raw: dict[str, Any]) -> Iterator[None]:
    """The jobs' doors' start-up (`launch.door`) for a call on the caller's thread: a job
    whose driver computes alone (one worker, no GPU: `local_shard.alone`) starts no Ray
    unless a call needs one (a shard given back, a reducer too large for the driver,
    damping=auto), then on this thread (`cluster.on_call`); others start it, and their
    workers, while the job is checked (`pipeline.prepare_started`). A Ray the caller
    connected is used as it is."""
    job = JobConfig.from_cfg(raw)
    if ray.is_initialized() or not local_shard.alone(job):
        yield
        return
    with cluster.on_call(job.cluster):
        yield


def _url(store: Any) -> str:
    if not isinstance(store, (str, os.PathLike)):
        raise ConfigError(
            f"store={store!r} is not a path or URL: give a string or a pathlib.Path, e.g. "
            "store='outputs/index' or store='s3://bucket/prefix'"
        )
    return os.fspath(store)


@dataclass
class Attribution:
    """One scored query set: the run that `Index.attribute` wrote to result set `name` in
    the index store. A later run of the same name replaces it (its files are deleted): this
    object then refuses to read rather than return the later run's scores."""

    index: GradientIndex
    name: str
    summary: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Any] | None = None  # this run's files (its _COMPLETE.json); None: current

    def topk(self) -> pd.DataFrame:
        """Per query, its `topk` proponents and opponents: one row per (query, rank, sign)."""
        with _own_errors():
            return results.load_table(self._ours(), self.name, "topk").to_pandas()

    def dense(self) -> np.ndarray:
        """Every score, (n_train, n_query); written when attribute(..., dense=True)."""
        with _own_errors():
            return results.load_dense(self._ours(), self.name)

    def self_influence(self) -> pd.DataFrame:
        """tau(i, i) and the squared gradient norm of every training row."""
        with _own_errors():
            return results.load_table(self._ours(), self.name, "self_influence").to_pandas()

    def _ours(self) -> GradientIndex:
        """The index, once sure that result set `name` still holds this run."""
        now = results.manifest(self.index, self.name)["files"]
        if self.files is not None and now != self.files:
            raise ResultsNotFoundError(
                f"these results were replaced by a later run of result set {self.name!r} in "
                f"{self.index.store.url_of('')} (their files are gone): read the later "
                f"Attribution, or give each call its own name (attribute(..., name=...)) to "
                f"keep both"
            )
        return self.index


class Index:
    """A gradient index and the job config that built it: made by `Index.build` (objects
    or factories) or `Index.from_config` (a job config), which also reopen an index built
    before with the same arguments (nothing is recomputed)."""

    def __init__(self, raw: dict[str, Any], summary: dict[str, Any] | None = None):
        """The index of `raw`, a resolved job config (what `build` and `from_config` pass);
        to open an index, call one of those."""
        if not isinstance(raw, dict):
            raise TypeError(
                f"Index({raw!r}) takes a resolved job config, not {type(raw).__name__}: to open "
                "an index, call Index.build(model, train, store=...) with the arguments that "
                "built it (nothing is recomputed) or Index.from_config(cfg)"
            )
        self.raw = raw
        self.summary = summary or {}
        # The reducer of the last `attribute` call, kept for the next (`close` stops it).
        self._kept = KeptReducer()

    def close(self) -> None:
        """Stop the reducer process that `attribute` keeps between calls (it also stops
        with this object, and with Ray). The index and its results stay in the store."""
        self._kept.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def build(cls, model: Any, train: Any, **settings: Any) -> Index:
        """Index every row of `train`; resumes an index already at `store` with the same
        fingerprint. `settings` are `job_config`'s keyword arguments, with its defaults (the
        signature shows them): task (None: the jobs' classification task), compression,
        k (None: the jobs' compression.k), store, storage_options, workers, overrides."""
        unknown = sorted(set(settings) - set(_BUILD_SETTINGS))
        if unknown:
            near = [n for u in unknown for n in difflib.get_close_matches(u, _BUILD_SETTINGS, 1)]
            raise TypeError(
                f"Index.build() got unexpected keyword arguments {unknown}"
                + (f" (did you mean {', '.join(near)}?)" if near else "")
                + f"; it takes model, train and {', '.join(_BUILD_SETTINGS)}, and other "
                f'settings as overrides=["key=value", ...] (the fields of grass_dist/config.py)'
            )
        return cls.from_config(job_config(model, train, **settings))

    @classmethod
    def from_config(cls, cfg: DictConfig | dict[str, Any]) -> Index:
        """Build (or resume) the index of a job config, as `python -m jobs.index` does
        (with overrides=["index.repair=true"], first check every committed shard and
        recompute the bad ones)."""
        with _own_errors():
            raw = copy.deepcopy(resolve(cfg))
        with _own_errors(), _ray_when_needed(raw):
            job = pipeline.prepare_started(raw)
            with pipeline.running(job):
                stages = pipeline.index_stages(job)
        return cls(raw, job_summary(job, stages))

    @property
    def gradient_index(self) -> GradientIndex:
        """The index in its store: fingerprint, committed shards, phi."""
        return assembly.open_index(JobConfig.from_cfg(self.raw))

    def attribute(
        self,
        query: Any,
        *,
        damping: float | str = 0.1,
        kind: str = "influence",
        topk: int = 10,
        dense: bool = False,
        name: str = "default",
        overrides: Sequence[str] = (),
    ) -> Attribution:
        """Score every row of `query` against the index: preconditioner, (damping=auto:
        choose delta on a validation split), scores. Results go to `results/<name>/`.
        The reducer process stays up for the next call (`close`)."""
        raw = copy.deepcopy(self.raw)
        raw["data"]["query"] = as_node(query, "query")
        raw["precondition"] = {**raw.get("precondition", {}), "damping": damping}
        raw["scoring"] = {**raw.get("scoring", {}), "kind": kind, "topk": topk, "dense": dense}
        raw["run"] = {**raw.get("run", {}), "name": name}
        raw = with_overrides(raw, overrides)
        with _own_errors(), _ray_when_needed(raw):
            job = pipeline.prepare_started(raw, create_index=False, query=True)
            with pipeline.running(job, self._kept):
                phi = pipeline.query_phi(job)
                stages = {"precondition": pipeline.run_precondition(job)}
                stages.update(pipeline.score_stage(job, phi))
        summary = job_summary(job, stages)
        return Attribution(job.index, name, summary, results.manifest(job.index, name)["files"])


# `help(Index.build)` shows the settings it takes, with their defaults, not `**settings`.
Index.build.__func__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *inspect.signature(job_config).parameters.values(),
    ],
    return_annotation="Index",
)
