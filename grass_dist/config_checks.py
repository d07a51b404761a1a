"""The checks of a job's configuration values, run by `JobConfig.validate`.

Types and unknown keys are refused by OmegaConf when the groups are merged
(`grass_dist.config`); these checks refuse the values no job can run with: ranges, NaN and
inf, names used as folders, targets, layers, compression sizes and half-given S3
credentials. Each message names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from grass_dist.errors import ConfigError
from grass_dist.urls import userinfo, without_userinfo

if TYPE_CHECKING:
    from grass_dist.config import (
        ClusterConfig,
        CompressionConfig,
        FaultsConfig,
        JobConfig,
        LdsConfig,
        PreconditionConfig,
        ServeConfig,
    )


def validate(job: JobConfig) -> None:
    """Refuse a value no job can run with, naming the field and the fix (ConfigError)."""
    _require_finite(job)
    _validate_names(job)
    _require_target(job.model, "model")
    _require_target(job.task, "task")
    if not isinstance(job.data, dict):
        raise ConfigError("config group 'data' is missing; add data.train and data.query")
    _require_target(job.data.get("train"), "data.train")
    if job.data.get("query") is not None:
        _require_target(job.data["query"], "data.query")
    _validate_compression(job.compression)
    if job.index.dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"index.dtype={job.index.dtype!r}; choose float32, float16 or bfloat16")
    for fname in ("shard_size", "batch_size"):
        if getattr(job.index, fname) <= 0:
            raise ConfigError(f"index.{fname} must be positive")
    _validate_layers(job.index.layers)
    _validate_damping(job.precondition)
    _validate_lds(job.lds)
    if not job.gc.grace_s >= 0:
        raise ConfigError(f"gc.grace_s={job.gc.grace_s} must be >= 0 seconds")
    if job.ensemble.size < 1:
        raise ConfigError(f"ensemble.size={job.ensemble.size} must be at least 1")
    if job.scoring.kind not in ("influence", "grad_dot", "cosine"):
        raise ConfigError(f"scoring.kind={job.scoring.kind!r}; use influence, grad_dot or cosine")
    if job.scoring.topk <= 0 or job.scoring.tile_rows <= 0:
        raise ConfigError("scoring.topk and scoring.tile_rows must be positive")
    st = job.store
    if st.retries < 0 or st.backoff_s < 0 or st.backoff_max_s < 0:
        raise ConfigError("store.retries, store.backoff_s and store.backoff_max_s must be >= 0")
    urls = (st.url, job.index.url, job.lds.url)
    if any(isinstance(u, str) and u.strip().lower().startswith(("s3://", "s3a://")) for u in urls):
        _validate_s3_credentials(st.storage_options)
    _validate_cluster(job.cluster)
    _validate_faults(job.faults)
    sc = job.scoring
    if sc.cpus_per_task <= 0:
        raise ConfigError(
            f"scoring.cpus_per_task={sc.cpus_per_task} must be positive, e.g. "
            f"scoring.cpus_per_task=1"
        )
    if sc.parallelism is not None and sc.parallelism < 1:
        raise ConfigError(
            f"scoring.parallelism={sc.parallelism} must be at least 1; set "
            f"scoring.parallelism=null to use every CPU of the cluster"
        )
    _validate_serve(job.serve)


def _validate_cluster(cl: ClusterConfig) -> None:
    if cl.num_workers <= 0:
        raise ConfigError("cluster.num_workers must be at least 1")
    if cl.max_workers is not None and cl.max_workers < cl.num_workers:
        raise ConfigError(
            f"cluster.max_workers={cl.max_workers} is below cluster.num_workers="
            f"{cl.num_workers}; set it to null (no growth) or at least num_workers"
        )
    if cl.cpus_per_worker <= 0:
        raise ConfigError(
            f"cluster.cpus_per_worker={cl.cpus_per_worker} must be positive (CPUs per "
            f"worker, fractions allowed), e.g. cluster.cpus_per_worker=1"
        )
    if cl.cpu_lanes is not None and cl.cpu_lanes < 1:
        raise ConfigError(f"cluster.cpu_lanes={cl.cpu_lanes} must be at least 1, or null (auto)")
    if cl.gpus_per_worker < 0:
        raise ConfigError(
            f"cluster.gpus_per_worker={cl.gpus_per_worker} must be >= 0; set 0 to run the "
            f"workers on CPUs only"
        )
    if cl.num_cpus is not None and cl.num_cpus < 1:
        raise ConfigError(f"cluster.num_cpus={cl.num_cpus} must be at least 1, or null (every CPU)")
    if not cl.driver_reduce_mib >= 0:
        raise ConfigError(
            f"cluster.driver_reduce_mib={cl.driver_reduce_mib} must be >= 0 MiB (0: the "
            f"reducer is always a process of its own)"
        )
    if cl.worker_resources is not None and not isinstance(cl.worker_resources, dict):
        raise ConfigError(
            f"cluster.worker_resources={cl.worker_resources!r} must map resource names to "
            f"amounts per worker, e.g. cluster.worker_resources={{spot:1}}"
        )
    for key, amount in (cl.worker_resources or {}).items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount >= 0:
            raise ConfigError(
                f"cluster.worker_resources.{key}={amount} must be >= 0 (an amount per worker)"
            )
    if cl.address is not None and not cl.address.strip():
        raise ConfigError(
            "cluster.address is empty; set it to null (embedded Ray), 'auto' or ray://host:port"
        )
    if cl.max_inflight_per_worker < 1:
        raise ConfigError("cluster.max_inflight_per_worker must be at least 1")
    if cl.max_reducer_restarts < 0 or cl.max_shard_retries < 0:
        raise ConfigError("cluster.max_reducer_restarts and max_shard_retries must be >= 0")
    for name in ("scale_check_s", "placement_timeout_s", "progress_interval_s"):
        if getattr(cl, name) <= 0:
            raise ConfigError(f"cluster.{name} must be a positive number of seconds")


def _validate_faults(f: FaultsConfig) -> None:
    if f.kill_reducer_during not in (None, "precondition", "score"):
        raise ConfigError(
            f"faults.kill_reducer_during={f.kill_reducer_during!r}; use precondition, score or null"
        )
    if f.kill_worker_after_rows is not None and f.kill_worker_after_rows < 1:
        raise ConfigError("faults.kill_worker_after_rows must be >= 1 (or null for no fault)")
    if f.shard_delay_s < 0:
        raise ConfigError("faults.shard_delay_s must be >= 0")


# Every compression method, and whether it is factorised (Linear layers only). The classes
# (grass_dist.compress.registry.REGISTRY) import torch, and a job checks its config before it
# starts Ray and while torch is still loading, so the check reads this table; tests/test_config
# checks that it holds the registry's methods with their classes' `factorised`.
COMPRESSION_METHODS: dict[str, bool] = {
    "factgrass": True,
    "gaussian": False,
    "grass": False,
    "identity": False,
    "logra": True,
    "rademacher": False,
    "random_mask": False,
    "selective_factgrass": True,
    "selective_grass": False,
    "selective_mask": False,
    "sjlt": False,
}


def _factorised(method: str, where: str) -> bool:
    """Whether `method` is factorised; ConfigError naming `where` if it is unknown."""
    if method not in COMPRESSION_METHODS:
        raise ConfigError(
            f"{where}={method!r} is unknown; choose one of {sorted(COMPRESSION_METHODS)}"
        )
    return COMPRESSION_METHODS[method]


def _validate_compression(c: CompressionConfig) -> None:
    _factorised(c.method, "compression.method")
    if _factorised(c.other, "compression.other"):
        raise ConfigError(
            f"compression.other={c.other!r} is factorised (Linear layers only); choose a flat "
            f"method for non-Linear layers, e.g. compression.other=grass"
        )
    for key, method in c.overrides.items():
        _factorised(method, f"compression.overrides.{key}")
    if c.k <= 0:
        raise ConfigError(f"compression.k={c.k} must be a positive integer, e.g. 1024")
    for name in ("mask_out", "mask_in", "proj_out", "proj_in"):
        size = getattr(c, name)
        if size is not None and size < 1:
            raise ConfigError(
                f"compression.{name}={size} must be a positive size, or null to derive it "
                f"from compression.k"
            )
    if c.blowup < 1 or c.sjlt_c < 1:
        raise ConfigError("compression.blowup and compression.sjlt_c must be >= 1")
    if c.jl_chunk_rows < 1 or c.jl_cache_mb < 0:
        raise ConfigError("compression.jl_chunk_rows must be >= 1 and jl_cache_mb >= 0")
    s = c.selective
    if min(s.samples - 1, s.holdout, s.epochs + 1, s.check_every) < 1 or s.lr <= 0 or s.lam < 0:
        raise ConfigError(
            "compression.selective needs samples >= 2, holdout >= 1, epochs >= 0, "
            f"check_every >= 1, lr > 0 and lam >= 0 (got {s})"
        )
    if not -1 <= s.min_spearman <= 1:
        raise ConfigError(
            f"compression.selective.min_spearman={s.min_spearman} is not a Spearman "
            f"correlation; choose a value in [-1, 1], e.g. 0.9"
        )


def _validate_serve(s: ServeConfig) -> None:
    if s.kind is not None and s.kind not in ("influence", "grad_dot", "cosine"):
        raise ConfigError(f"serve.kind={s.kind!r}; use influence, grad_dot, cosine or null")
    for name in ("replicas", "max_ongoing_requests", "topk", "max_topk", "max_examples"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"serve.{name} must be positive")
    if s.topk > s.max_topk:
        raise ConfigError(f"serve.topk={s.topk} exceeds serve.max_topk={s.max_topk}")
    if not 0 < s.port < 65536:
        raise ConfigError(f"serve.port={s.port} is not a TCP port (1..65535)")
    if s.max_request_bytes <= 0 or s.cache_bytes < 0 or s.cpus_per_replica <= 0:
        raise ConfigError(
            "serve.max_request_bytes and serve.cpus_per_replica must be positive and "
            "serve.cache_bytes >= 0"
        )
    if not s.host.strip() or not s.app_name.strip():
        raise ConfigError(
            "serve.host and serve.app_name must not be empty; e.g. serve.host=127.0.0.1 "
            "serve.app_name=grass_dist"
        )
    if not s.route_prefix.startswith("/"):
        raise ConfigError(f"serve.route_prefix={s.route_prefix!r} must start with '/'")


def _validate_damping(p: PreconditionConfig) -> None:
    if p.damping == "auto":
        if not p.grid or min(p.grid) <= 0:
            raise ConfigError("precondition.grid must list positive deltas, e.g. [1e-3,1e-2,0.1]")
        if not 0 < p.validation < 1 or p.proxy_topk < 1:
            raise ConfigError(
                f"precondition.validation={p.validation} must be in (0, 1) and "
                f"precondition.proxy_topk={p.proxy_topk} >= 1"
            )
        return
    if isinstance(p.damping, bool) or not isinstance(p.damping, (int, float)):
        raise ConfigError(f"precondition.damping={p.damping!r} must be a number >= 0 or 'auto'")
    if p.damping < 0:
        raise ConfigError("precondition.damping must be >= 0 (relative to trace(H)/k)")
    p.damping = float(p.damping)


def _validate_lds(c: LdsConfig) -> None:
    if c.subsets < 2 or c.seeds < 1 or c.bootstrap < 0 or c.cpus_per_task <= 0:
        raise ConfigError(
            "lds.subsets must be >= 2, lds.seeds >= 1, lds.bootstrap >= 0 and "
            f"lds.cpus_per_task > 0 (got {c})"
        )
    if not 0 < c.fraction < 1:
        raise ConfigError(f"lds.fraction={c.fraction} must be in (0, 1), e.g. 0.5")
    if c.output not in ("logprob", "margin"):
        raise ConfigError(f"lds.output={c.output!r}; choose logprob or margin")
    if c.train is not None and not (
        isinstance(c.train, dict) and isinstance(c.train.get("_target_"), str)
    ):
        raise ConfigError(
            f"lds.train={c.train!r} needs a _target_: the import path of your retraining "
            f"callable (dataset, seed, **args) -> nn.Module, e.g. "
            f"+lds.train._target_=my_pkg.train.fit"
        )


def _require_finite(job: JobConfig) -> None:
    """Refuse NaN and inf in every number of every config group.

    A NaN passes every `x <= 0` check and an inf damping zeroes every score, so they are
    refused here once, by field name, rather than in each range check.
    """
    groups = [f.name for f in dataclasses.fields(job)]  # the typed groups, not user nodes
    for name in (g for g in groups if dataclasses.is_dataclass(getattr(job, g))):
        for where, value in _numbers(getattr(job, name), name):
            if not math.isfinite(value):
                raise ConfigError(f"{where}={value} must be a finite number; set a real value")


def _numbers(node: Any, where: str) -> list[tuple[str, float]]:
    """(field path, value) of every float under `node` (dataclasses, lists, dicts)."""
    if isinstance(node, float):
        return [(where, node)]
    if dataclasses.is_dataclass(node):
        fields = [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
    elif isinstance(node, dict):
        fields = list(node.items())
    elif isinstance(node, list):
        return [n for i, v in enumerate(node) for n in _numbers(v, f"{where}[{i}]")]
    else:
        return []
    return [n for key, v in fields for n in _numbers(v, f"{where}.{key}")]


def _safe_name(value: str) -> bool:
    """True when `value` can name one folder or file: no separators, not '.' or '..'."""
    bad = {"/", "\\"} | {chr(c) for c in range(32)}
    return bool(value.strip()) and value not in (".", "..") and not bad & set(value)


def _validate_names(job: JobConfig) -> None:
    """Names that become store paths, and the store URL itself, before anything is written."""
    named = [("run.name", job.run.name), ("precondition.name", job.precondition.name)]
    named += [(f"lds.results[{i}]", r) for i, r in enumerate(job.lds.results or [])]
    for where, value in named:
        if not _safe_name(value):
            raise ConfigError(
                f"{where}={value!r} must name a single folder: no '/' or '\\', not "
                f"empty, '.' or '..'; e.g. {where}=my_queries"
            )
    if not str(job.run.output_dir).strip():
        raise ConfigError(
            "run.output_dir is empty, which would put caches, logs and the default index at "
            "the filesystem's root; set a folder, e.g. run.output_dir=outputs"
        )
    if not job.store.url.strip():
        raise ConfigError(
            "store.url is empty; set it to the index location, e.g. store.url=outputs/index "
            "or store.url=s3://bucket/prefix"
        )
    for where, url in (("index.url", job.index.url), ("lds.url", job.lds.url)):
        if url is not None and not url.strip():
            raise ConfigError(f"{where} is empty; set a URL, or null to use store.url")
    for where, url in (("store.url", job.store.url), ("index.url", job.index.url)):
        if url is not None and userinfo(url) is not None:
            raise ConfigError(
                f"{where} holds credentials before an '@' ({without_userinfo(url, '***')}), "
                f"which the store does not read there and which logs would show: give "
                f"{where}={without_userinfo(url)}, and the credentials as AWS_ACCESS_KEY_ID "
                f"and AWS_SECRET_ACCESS_KEY in the environment of every node (README: S3 "
                f"credentials through environment variables)"
            )
        if url is not None and url.strip().lower().startswith("memory://"):
            raise ConfigError(
                f"{where}={url} is a filesystem in one process's memory, which the job's "
                "workers and reducer (other processes) cannot see: use a local path or an "
                "s3:// URL"
            )


# The credential options s3fs takes (a key and its secret, and a session token that goes
# with both), and the same three as botocore's client arguments under client_kwargs.
_S3_CREDENTIALS = {
    "store.storage_options": ("key", "secret", "token"),
    "store.storage_options.client_kwargs": (
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
    ),
}


def _validate_s3_credentials(options: Any) -> None:
    """Refuse part of a credential (a key without its secret, the reverse, or a token
    without both), in storage_options or in its client_kwargs: botocore would fail on the
    first request, with a fix that names the environment. The message names the options
    given, never their values."""
    if not isinstance(options, dict):
        return
    for where, names in _S3_CREDENTIALS.items():
        node = options if where == "store.storage_options" else options.get("client_kwargs")
        if isinstance(node, dict):
            _refuse_half_credential(where, names, node)


def _refuse_half_credential(where: str, names: tuple[str, str, str], node: dict) -> None:
    given = [n for n in names if node.get(n) not in (None, "")]
    lacks = [n for n in names[:2] if n not in given]
    if not given or not lacks:
        return
    token = names[2] in given
    adds = " ".join(f"+{where}.{n}=..." for n in lacks)
    raise ConfigError(
        f"{where} gives {' and '.join(given)} but not {' and '.join(lacks)}: "
        f"give {', '.join(names[:2]) + ' and ' + names[2] if token else 'both'} ({adds}) or "
        f"{'none of them' if token else 'neither'} (credentials then come from the environment "
        f"of every node: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        f"{' / AWS_SESSION_TOKEN' if token else ''}, AWS_PROFILE or ~/.aws; README: S3 "
        f"credentials through environment variables)"
    )


def _validate_layers(layers: list[str] | None) -> None:
    if layers is None:
        return
    if not layers:
        raise ConfigError(
            "index.layers=[] names no layer to attribute; list module names, e.g. "
            "index.layers=[fc1,out], or set index.layers=null for every Linear layer"
        )
    twice = sorted({n for n in layers if layers.count(n) > 1})
    if twice:
        raise ConfigError(f"index.layers names {twice} more than once; list each layer once")


def _require_target(node: Any, where: str) -> None:
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(
            f"'{where}' needs a '_target_': the import path of a callable that returns it, "
            f"e.g. {where}._target_=my_pkg.my_module.build (got {node!r})"
        )
