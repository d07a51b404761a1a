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
is used; otherwise an embedded one starts as the job is checked, or, for a job of one
worker on a machine without GPUs, only if a call needs one (`_ray_when_needed`).
"""

from __future__ import annotations

import copy
import difflib
import inspect
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import ray
from omegaconf import DictConfig
from ray.exceptions import RayTaskError

from grass_dist import assembly, pipeline
from grass_dist.api_config import BUILD_SETTINGS, as_node, job_config, with_overrides
from grass_dist.config import JobConfig, resolve
from grass_dist.errors import GrassError, ResultsNotFoundError
from grass_dist.index import GradientIndex
from grass_dist.runtime import cluster, local_shard
from grass_dist.runtime.reducer_handle import KeptReducer
from grass_dist.scoring import results
from grass_dist.summary import job_summary

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
        unknown = sorted(set(settings) - set(BUILD_SETTINGS))
        if unknown:
            near = [n for u in unknown for n in difflib.get_close_matches(u, BUILD_SETTINGS, 1)]
            raise TypeError(
                f"Index.build() got unexpected keyword arguments {unknown}"
                + (f" (did you mean {', '.join(near)}?)" if near else "")
                + f"; it takes model, train and {', '.join(BUILD_SETTINGS)}, and other "
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
