"""Typed configuration of a job: one dataclass per config group, every field documented.

These dataclasses are the one source of every default. `register_configs` hands
`JobConfig` to Hydra as the base of `conf/config.yaml`, so a YAML preset sets only what
differs from them (tests/test_presets.py refuses a preset that restates a default).
`JobConfig.from_cfg` merges each group onto its dataclass (unknown keys and wrong types
are refused by OmegaConf) and validates values, so a bad config fails before Ray starts
or any gradient is computed; its messages name the settings meant (grass_dist.config_help).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from grass_dist import config_checks
from grass_dist.errors import ConfigError


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    name: str = _f("default", "name of this query set / results folder under the index")
    output_dir: str = _f("outputs", "local folder for caches, logs and the default index")


@dataclass
class SelectiveConfig:
    samples: int = _f(256, "training rows whose gradients the selective masks are fitted to")
    holdout: int = _f(64, "further training rows that play the queries in the objective")
    epochs: int = _f(300, "Adam steps (full batch) at most")
    lr: float = _f(0.02, "Adam learning rate on the mask logits")
    lam: float = _f(1e-4, "lambda: weight of the sparsity penalty f * sum(m)")
    min_spearman: float = _f(0.9, "stop once masked-vs-exact Spearman drops below this")
    check_every: int = _f(50, "steps between two checks of the early-stopping Spearman")
    seed: int = _f(0, "seed of the row sample and the logit init (part of the fingerprint)")


@dataclass
class CompressionConfig:
    method: str = _f(
        "factgrass",
        "method for Linear layers: factgrass | selective_factgrass | logra | grass | "
        "selective_grass | selective_mask | sjlt | random_mask | gaussian | rademacher | "
        "identity",
    )
    other: str = _f(
        "grass",
        "method for non-Linear layers named in index.layers (flat methods only): grass | "
        "selective_grass | selective_mask | sjlt | random_mask | gaussian | rademacher | identity",
    )
    overrides: dict[str, str] = _f({}, "layer name or module class name -> method")
    k: int = _f(256, "compressed size per layer")
    blowup: int = _f(4, "mask budget k' = blowup * k before the SJLT")
    mask_out: int | None = _f(None, "explicit mask size on the output-gradient side")
    mask_in: int | None = _f(None, "explicit mask size on the input side (bias included)")
    sjlt_c: int = _f(1, "non-zeros per input coordinate in the SJLT")
    proj_out: int | None = _f(None, "LoGra k_o (null: factor pair of k nearest sqrt(k))")
    proj_in: int | None = _f(None, "LoGra k_i (set with proj_out; k = k_o * k_i)")
    jl_chunk_rows: int = _f(4096, "dense JL: rows of R drawn at a time (memory only, same R)")
    jl_cache_mb: int = _f(256, "dense JL: keep R on the device when at most this many MiB")
    seed: int = _f(0, "seed of every mask and sketch (part of the fingerprint)")
    whole_small_layers: bool = _f(
        True,
        "keep a layer whole (method identity, its exact gradient) when its gradient has at "
        "most k entries; false refuses such a layer instead",
    )
    selective: SelectiveConfig = field(
        default_factory=SelectiveConfig, metadata={"help": "Selective Mask fitting"}
    )


@dataclass
class IndexConfig:
    url: str | None = _f(None, "index location; defaults to store.url")
    layers: list[str] | None = _f(
        None, "modules to attribute (any with parameters); null = every Linear layer"
    )
    shard_size: int = _f(
        128, "most training rows per shard (the unit of work and of commit); rows split evenly"
    )
    batch_size: int = _f(64, "rows per forward/backward batch inside a shard")
    dtype: str = _f("float32", "storage dtype of phi: float32 | float16 | bfloat16")
    verify: bool = _f(True, "check each shard's sha256 when reading")
    repair: bool = _f(False, "check every committed shard first, recompute the bad ones")


DAMPING_GRID = [10.0**e for e in range(-7, 3)]


@dataclass
class PreconditionConfig:
    damping: Any = _f(
        0.1,
        "relative damping delta (lambda_l = delta * trace(H_l) / k_l), or 'auto': pick it "
        "from `grid` on a validation split of the queries (see grass_dist.fidelity.damping)",
    )
    name: str = _f("fisher", "file name of the preconditioner under preconditioner/")
    grid: list[float] = _f(DAMPING_GRID, "damping=auto: the deltas tried (default 1e-7..1e2)")
    validation: float = _f(0.1, "damping=auto: share of the queries that choose delta")
    validation_seed: int = _f(0, "damping=auto: seed of the validation split")
    proxy_topk: int = _f(10, "damping=auto without ground truth: proponents per query judged")


@dataclass
class LdsConfig:
    subsets: int = _f(50, "m: random training subsets whose models are retrained")
    seeds: int = _f(3, "s: training seeds per subset (outputs are averaged over them)")
    fraction: float = _f(0.5, "share of the training rows in each subset")
    seed: int = _f(0, "seed of the subsets and of the retraining seeds")
    output: str = _f("logprob", "f(z_t; theta): logprob of the true label | margin")
    bootstrap: int = _f(1000, "bootstrap resamples of the queries for the 95% interval")
    cpus_per_task: float = _f(1.0, "Ray CPUs per retraining task")
    url: str | None = _f(None, "where ground truth lives; null = <store.url>/lds")
    results: list[str] | None = _f(None, "result sets evaluated by jobs.lds; null = [run.name]")
    # Any, not dict | None: Hydra cannot add `+lds.train._target_=...` under a typed
    # Optional[Dict] that is null; _validate_lds checks the type instead.
    train: Any = _f(
        None,
        "retraining recipe: {_target_: a callable (dataset, seed, **args) -> nn.Module, args...}; "
        "null = the model builder's own (model=digits_mlp, digits_cnn)",
    )


@dataclass
class EnsembleConfig:
    size: int = _f(1, "C models attributed and averaged; member c has model.seed + c")
    models: list[dict[str, Any]] = _f(
        [],
        "explicit per-member model overrides (e.g. [{epochs: 10}, {epochs: 20}]); wins over size",
    )


@dataclass
class ScoringConfig:
    kind: str = _f("influence", "influence | grad_dot | cosine (over all layers at once)")
    topk: int = _f(10, "proponents and opponents kept per query")
    dense: bool = _f(False, "also write the full n_train x n_query score matrix, tile by tile")
    self_influence: bool = _f(True, "write tau(i, i) for every training row")
    tile_rows: int = _f(4096, "training rows scored per tile (bounds memory)")
    breakdown: bool = _f(False, "add per-layer score columns score.<layer> to the top-k table")
    parallelism: int | None = _f(None, "scorer tasks; null = cluster CPUs / cpus_per_task")
    cpus_per_task: float = _f(1.0, "CPUs per scorer task (also its torch thread count)")


@dataclass
class StoreConfig:
    url: str = _f("outputs/index", "fsspec URL of the gradient index: path, file://, s3://")
    storage_options: dict[str, Any] = _f({}, "fsspec options (endpoint, region, ...)")
    retries: int = _f(5, "retries of a store operation that failed transiently (outage, 5xx)")
    backoff_s: float = _f(1.0, "first retry delay; doubles per retry (jittered)")
    backoff_max_s: float = _f(30.0, "cap on one retry delay")


@dataclass
class ClusterConfig:
    address: str | None = _f(None, "null = embedded Ray; 'auto' or ray://... joins a cluster")
    num_workers: int = _f(2, "GradientWorker actors (one model replica each)")
    cpus_per_worker: float = _f(1.0, "CPUs per worker (also its torch thread count)")
    cpu_lanes: int | None = _f(
        None,
        "batches a CPU worker computes at once, on its threads // lanes torch threads each "
        "(null = one per thread up to 4 threads, else 1)",
    )
    gpus_per_worker: float = _f(1.0, "GPUs per worker when the cluster has GPUs")
    num_cpus: int | None = _f(None, "logical CPUs of the embedded Ray (null = machine)")
    max_inflight_per_worker: int = _f(2, "shards in flight per worker (backpressure)")
    max_shard_retries: int = _f(3, "attempts per shard before the job fails")
    max_workers: int | None = _f(None, "elastic ceiling: grow to this many workers as nodes join")
    scale_check_s: float = _f(2.0, "seconds between checks for free resources to grow the pool")
    # Any, not dict | None: Hydra cannot merge `cluster.worker_resources={spot:1}` into a
    # typed null dict, and a typed empty dict would need `+` for its first key.
    worker_resources: Any = _f(None, "custom resources per worker: {spot: 1}")
    placement_timeout_s: float = _f(600.0, "fail when no worker can be placed for this long")
    max_reducer_restarts: int = _f(2, "new reducers started for a stage whose reducer died")
    progress_interval_s: float = _f(2.0, "seconds between rewrites of the progress record")
    driver_shard: bool = _f(
        True,
        "an embedded Ray's driver indexes shards on the CPU: as one of num_workers where the "
        "pool would not grow, else until the first worker is ready; and it differentiates a "
        "query set of one shard_size itself while no worker is ready",
    )
    driver_reduce_mib: float = _f(
        64.0,
        "the driver builds the preconditioner and scores itself, with no reducer process, "
        "when the index's gradients and preconditioner take at most this many MiB (0: never)",
    )


@dataclass
class FaultsConfig:
    """Fault injection for resilience tests and drills; every fault fires at most once per index."""

    kill_worker_after_rows: int | None = _f(None, "a worker exits after computing this many rows")
    kill_reducer_during: str | None = _f(None, "the reducer exits during: precondition | score")
    shard_delay_s: float = _f(0.0, "extra seconds each shard takes (simulates a slow model)")


@dataclass
class ServeConfig:
    host: str = _f("127.0.0.1", "address the HTTP service binds (non-loopback is warned about)")
    port: int = _f(8000, "HTTP port of the service")
    route_prefix: str = _f("/", "URL prefix of the service's routes (query, healthz)")
    app_name: str = _f("grass_dist", "Ray Serve application name")
    replicas: int = _f(1, "model replicas answering queries")
    cpus_per_replica: float = _f(1.0, "CPUs per replica (also its torch thread count)")
    max_ongoing_requests: int = _f(16, "requests a replica accepts at once (more wait)")
    topk: int = _f(10, "proponents and opponents returned when a request does not say")
    max_topk: int = _f(1000, "largest topk a request may ask for")
    kind: str | None = _f(None, "default score kind; null = scoring.kind")
    max_examples: int = _f(64, "most examples per request (more: HTTP 413)")
    max_request_bytes: int = _f(4_000_000, "largest request body (more: HTTP 413)")
    cache_bytes: int = _f(1 << 30, "hold the train phi in replica memory up to this size")


@dataclass
class GcConfig:
    grace_s: float = _f(
        3600.0, "jobs.gc keeps uncommitted attempts and unfinished scores younger than this (s)"
    )
    dry_run: bool = _f(False, "jobs.gc reports what it would remove and removes nothing")


@dataclass
class JobConfig:
    """The validated job: user callables stay as raw Hydra nodes with `_target_`."""

    model: dict[str, Any]
    data: dict[str, Any]
    task: dict[str, Any]
    run: RunConfig = field(default_factory=RunConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    precondition: PreconditionConfig = field(default_factory=PreconditionConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    lds: LdsConfig = field(default_factory=LdsConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    gc: GcConfig = field(default_factory=GcConfig)

    @property
    def index_url(self) -> str:
        return self.index.url or self.store.url

    @classmethod
    def from_cfg(cls, cfg: DictConfig | dict) -> JobConfig:
        cfg = OmegaConf.create(resolve(cfg))  # groups are merged one by one: resolve first
        names = {f.name for f in fields(cls)}
        unknown = [str(k) for k in cfg if k not in names]
        if unknown:  # `+topk=3` adds a key no job reads
            from grass_dist.config_help import SETTINGS_ARE, not_a_setting  # it reads JobConfig

            raise ConfigError(
                f"{'; '.join(map(not_a_setting, unknown))}: {SETTINGS_ARE}; new keys are "
                f"not accepted"
            )
        typed = {}
        for name, schema in _GROUPS.items():
            node = cfg.get(name, {}) or {}
            try:
                merged = OmegaConf.merge(OmegaConf.structured(schema), node)
            except OmegaConfBaseException as e:
                from grass_dist.config_help import merge_error  # it reads JobConfig

                raise ConfigError(merge_error(name, e)) from None
            typed[name] = OmegaConf.to_object(merged)
        raw = {}
        for name in ("model", "data", "task"):
            node = cfg.get(name)
            raw[name] = OmegaConf.to_container(node, resolve=True) if node is not None else None
        job = cls(**raw, **typed)
        job.validate()
        return job

    def validate(self) -> None:
        """Refuse values no job can run with (see grass_dist.config_checks)."""
        config_checks.validate(self)


# The name conf/config.yaml's defaults list gives JobConfig.
JOB_SCHEMA = "_job_schema"


def register_configs() -> None:
    """Give Hydra `JobConfig` as `_job_schema`, the base conf/config.yaml is merged onto.

    Call it before Hydra composes `conf/` (the jobs, tests and benchmarks do): every field
    then exists with its dataclass default, a preset sets only what differs, and Hydra
    refuses an unknown key or a value of the wrong type on the command line. An explicit
    call rather than an import side effect, so importing the library changes no global
    state; calling it again replaces the entry with the same one.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=JOB_SCHEMA, node=JobConfig)


def resolve(cfg: DictConfig | dict) -> dict[str, Any]:
    """The composed config as plain dicts and lists, every `${...}` interpolation resolved.

    A preset may take values from another group's preset (digits_mlp reads its sizes from
    the digits data preset); selecting one without the other leaves a dangling reference,
    refused here with the key and the fix instead of OmegaConf's traceback.
    """
    if not isinstance(cfg, DictConfig):
        return cfg
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "the config"
        said = str(getattr(e, "msg", e)).splitlines()[0]
        if "Environment variable" in said:  # ${oc.env:NAME}, and no NAME is set
            raise ConfigError(
                f"{key} could not be resolved ({said}): set that variable in the job's "
                f"environment, give {key} a value, or a default: ${{oc.env:NAME,default}}"
            ) from None
        raise ConfigError(
            f"{key} could not be resolved ({said}). "
            f"The presets selected do not fit together (e.g. model=digits_mlp takes its sizes "
            f"from data=digits): select matching presets (model=custom with data=custom; a "
            f"language model on your own text: model=hf_causal_lm with data=text_files, "
            f"docs/language_models.md), or set {key} yourself"
        ) from None


_GROUPS = {
    "run": RunConfig,
    "compression": CompressionConfig,
    "index": IndexConfig,
    "precondition": PreconditionConfig,
    "scoring": ScoringConfig,
    "store": StoreConfig,
    "cluster": ClusterConfig,
    "faults": FaultsConfig,
    "serve": ServeConfig,
    "lds": LdsConfig,
    "ensemble": EnsembleConfig,
    "gc": GcConfig,
}
