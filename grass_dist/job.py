"""A job as the driver holds it, and its start: `prepare` checks everything before anything
is written to the store or any gradient is computed (config, model, task, data, layers,
compressors, store, fingerprint) and never starts Ray; `prepare_started`, what the `jobs/`
doors run, starts meanwhile what the job will need: an embedded Ray, the workers' processes
and the driver's own shards (`runtime.local_shard`).
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import ray
from omegaconf import DictConfig

from grass_dist import assembly
from grass_dist.build import (
    build_dataset,
    build_model,
    build_task,
    check_compressors,
    check_rows,
    fingerprint,
)
from grass_dist.config import JobConfig, resolve
from grass_dist.data.identity import check_committed_content, check_committed_rows
from grass_dist.errors import IndexNotFoundError
from grass_dist.gradients.capture import layers_that_run
from grass_dist.gradients.computer import module_calls
from grass_dist.gradients.learned_state import save_states
from grass_dist.index import GradientIndex
from grass_dist.index.content import row_digest
from grass_dist.index.shards import repair_fix
from grass_dist.models.state import state_hash
from grass_dist.runtime import compute_thread, driver_shard, local_shard
from grass_dist.runtime.cluster import CONNECTING, connect, on_request_active, request_soon
from grass_dist.runtime.local_shard import LocalShard
from grass_dist.runtime.placement import check_placeable, worker_factory
from grass_dist.runtime.pool import ActorPool
from grass_dist.runtime.progress import JobProgress
from grass_dist.runtime.reach import check_reachable
from grass_dist.runtime.reducer_handle import ReducerHandle, reduces_in_driver
from grass_dist.runtime.worker import plan_shards
from grass_dist.target_checks import check_targets_set, unset_fields

log = logging.getLogger("grass_dist")


def new_job_id() -> str:
    """Sortable and unique: names this run's progress record."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class Job:
    """A validated job with its driver-side model and the index it writes to."""

    cfg: JobConfig
    raw: dict[str, Any]
    model_hash: str
    fingerprint: dict[str, Any]
    n_train: int
    timings: dict[str, float] = field(default_factory=dict)
    whole_layers: list[str] = field(default_factory=list)
    skipped_records: int = 0  # bad training records left out on data.train.on_bad_record=skip
    index: GradientIndex | None = None
    job_id: str = field(default_factory=new_job_id)
    progress: JobProgress | None = None
    started: float = field(default_factory=time.time)  # time.time() the job started
    first_shard_s: float | None = None  # seconds from `started` to the first shard commit
    startup_s: dict[str, float] = field(default_factory=dict)  # milestone -> s from `started`
    _spares: list[Any] = field(default_factory=list)  # unstarted worker actors (prepare_started)
    _pool: ActorPool | None = None
    _local: LocalShard | None = None  # the driver's own shards (prepare_started)
    _member: bool = False  # the driver is one of the computing processes (LocalShard.member)
    _replica: assembly.Replica | None = None  # the driver's, for its own queries (query_phi)
    _reducer: ReducerHandle | None = None

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        if self.progress is not None:
            self.progress.begin(name)
        try:
            yield
        except BaseException as e:
            if self.progress is not None:
                self.progress.end(name, time.perf_counter() - t0, e)
            raise
        self.timings[name] = time.perf_counter() - t0
        if self.progress is not None:
            self.progress.end(name, self.timings[name])
        log.info("stage %s took %.2f s", name, self.timings[name])

    def reduces_in_driver(self) -> bool:
        """Whether this job's reducer is an object of the driver (`reduces_in_driver`)."""
        return reduces_in_driver(self.cfg, dict(self.index.layers), self.n_train)

    def reached(self, milestone: str, at: float | None = None) -> None:
        """Record, the first time only, when (time.time(), default now) the job's start-up
        reached `milestone`: 'prepared' (the driver checked config, model, data and store
        and holds its replica), 'ray' (Ray is up), 'first_worker' (a worker is ready)."""
        self.startup_s.setdefault(milestone, (time.time() if at is None else at) - self.started)

    def first_shard_committed(self, seconds: float | None = None) -> None:
        """Record (summary, progress record, log) how long the job took to commit its
        first shard (default: until now): the start-up cost a user waits for."""
        self.first_shard_s = time.time() - self.started if seconds is None else seconds
        self.progress.first_shard(self.first_shard_s)
        log.info("first shard committed %.2f s after the job started", self.first_shard_s)


def prepare(cfg: DictConfig | dict, *, create_index: bool = True, query: bool = False) -> Job:
    """Validate everything and open (or create) the index; no Ray, no gradients.

    The checks run in order of cost, and all of them before the first write to the store:
    config (and that its Ray could place a worker), model, task, data (non-empty, row 0
    through the task and model; data.query too when `query` or configured), layers and
    compressors, then the store. Only then may learned masks be fitted.
    """
    return _prepare(cfg, create_index, query)[0]


def _prepare(
    cfg: DictConfig | dict, create_index: bool, query: bool
) -> tuple[Job, assembly.Replica, Any]:
    """`prepare`'s job, and the driver's replica and training data: built on the compute
    thread (`runtime.compute_thread`), which also computes the driver's shards."""
    return compute_thread.call(_prepared, cfg, create_index, query)


def _prepared(
    cfg: DictConfig | dict, create_index: bool, query: bool
) -> tuple[Job, assembly.Replica, Any]:
    raw = resolve(cfg)
    job_cfg = JobConfig.from_cfg(raw)
    check_placeable(job_cfg.cluster)  # workers its Ray could never place
    model = build_model(job_cfg)
    task = build_task(job_cfg)
    train = build_dataset(job_cfg, "train")
    check_rows(job_cfg, model, task, train, "train")
    # The layers to attribute, from the modules row 0's forward runs: every later check,
    # the compressors and the fingerprint name them (workers read them from the index).
    calls = module_calls(model, task, train[0])
    job_cfg.index.layers = layers_that_run(model, job_cfg.index.layers, calls)
    shown = job_cfg.index.layers[:8] + ["..."] * (len(job_cfg.index.layers) > 8)
    log.info("attributing %d layers: %s", len(job_cfg.index.layers), ", ".join(shown))
    row_digest(train[0])  # ConfigError now for items without a stable content digest
    query_node = job_cfg.data.get("query")
    if not query and query_node is not None and unset_fields(query_node):
        # An index-only job reads no queries: a query preset still waiting for its
        # path (data=text_files) is no reason to refuse it.
        log.info("data.query leaves %s unset: not checked", ", ".join(unset_fields(query_node)))
    elif query or query_node is not None:
        # A missing, empty or unfitting query set fails here, not after the index build.
        check_rows(job_cfg, model, task, build_dataset(job_cfg, "query"), "query")
    whole = check_compressors(job_cfg, model)
    if whole:
        log.info(
            "keeping layers %s whole (exact gradients): each has at most compression.k=%d "
            "entries (compression.whole_small_layers=true)",
            whole,
            job_cfg.compression.k,
        )
    if not create_index:
        assembly.open_index(job_cfg)  # IndexNotFoundError before fitting
    store = assembly.open_store(job_cfg)
    store.check_writable()
    compressors = assembly.driver_compressors(job_cfg, model, task, train)
    fp = fingerprint(job_cfg, model, compressors, task, train)
    if create_index:
        save_states(store, compressors)  # learned masks, before the index that names them
    index = assembly.checked_index(job_cfg, fp) if create_index else assembly.open_index(job_cfg)
    if not create_index:
        assembly.checked_index(job_cfg, fp)  # refuses a mismatch
    check_committed_rows(index, train)  # growing data.train is fine, changing it is not
    if create_index:  # a job that adds shards must add them to the same data
        check_committed_content(index, train)
        warn_unsound_files(index)
    else:
        check_scorable(index, len(train))
    job = Job(
        job_cfg,
        raw,
        state_hash(model),
        fp,
        len(train),
        index=index,
        whole_layers=whole,
        skipped_records=getattr(train, "skipped_records", 0),
    )
    job.progress = JobProgress(index.store, job.job_id, job_cfg.cluster.progress_interval_s)
    replica = assembly.Replica(model, task, compressors)
    if query and local_shard.wanted(job_cfg):
        job._replica = replica  # the driver may compute a few queries itself (query_phi)
    return job, replica, train


def warn_unsound_files(index: GradientIndex, shown: int = 5) -> None:
    """Say which committed shards' files are gone or cut short: the index stage skips
    committed shards, and a later reading stage would refuse them."""
    unsound = index.unsound_files()
    if unsound:
        log.warning(
            "%d committed shard file(s) are missing or not of their committed size: %s%s. "
            "This job skips committed shards. %s",
            len(unsound),
            "; ".join(unsound[:shown]),
            f"; and {len(unsound) - shown} more" if len(unsound) > shown else "",
            repair_fix(index.store),
        )


def check_scorable(index: GradientIndex, n_train: int) -> None:
    """Refuse to score an index without a committed shard (before any query is computed);
    warn of one that holds only some of data.train's rows, whose scores rank those alone."""
    rows, shards = index.num_rows(), len(index.committed())
    again = (
        "run python -m jobs.index with the same settings (it resumes: committed shards are kept)"
    )
    if shards == 0:
        raise IndexNotFoundError(
            f"the gradient index at {index.store.url_of('')} holds no committed shard yet (a "
            f"jobs.index stopped before its first commit, or one still running): {again}, "
            f"then score"
        )
    if rows < n_train:
        log.warning(
            "the gradient index at %s holds %d of data.train's %d rows (%d committed shard%s): "
            "the scores rank those rows only; to attribute to every row, %s",
            index.store.url_of(""),
            rows,
            n_train,
            shards,
            "s" * (shards != 1),
            again,
        )


def prepare_started(
    cfg: DictConfig | dict,
    *,
    create_index: bool = True,
    query: bool = False,
    started: float | None = None,
) -> Job:
    """`prepare`, while an embedded Ray and the job's worker actors start: what the `jobs/`
    doors run (with `cluster.address` set, `prepare` alone).

    The config is checked first, so a malformed one never starts Ray. Then `prepare` (model,
    data, store) runs on another thread while this one starts Ray and creates the worker
    actors unstarted: their processes start and import while the driver checks the job
    (Ray's processes die with the thread that started them, so Ray gets the caller's). Once
    the checks pass, an index job's driver starts on its own shards (`_prepare_local`).
    The store is written only once every check passed, as by `prepare`; a refused job stops
    the actors, and a Ray started here, before its error is raised. `started` (time.time(),
    default now) is when the job started, for `Job.first_shard_s`.
    """
    started = time.time() if started is None else started
    raw = resolve(cfg)
    job_cfg = JobConfig.from_cfg(raw)
    check_targets_set(job_cfg, query)
    if job_cfg.cluster.address is not None:
        # Joining a running cluster is quick, and a job submitted to one runs in a working
        # directory Ray manages for it: prepare first and connect later, as `prepare` does.
        # But first make sure there is a cluster to join, before the store is written.
        if not ray.is_initialized():
            check_reachable(job_cfg.cluster.address)
        job = prepare(raw, create_index=create_index, query=query)
        job.started = started
        job.reached("prepared")
        return job
    ours = not ray.is_initialized()
    # A driver that builds an index alone needs Ray only for a shard it gives back: Ray
    # starts then (`actors.connect_job`), if ever. So does a `jobs/` job that scores, whose
    # door starts its Ray on request (`cluster.OnRequest`); one that will need Ray for its
    # reducer or damping=auto asks for it as soon as that is known (`_needs_ray`).
    alone = ours and local_shard.alone(job_cfg)
    later = alone and (create_index and not query or on_request_active())
    spares: list[Any] = []
    ray_up: float | None = None
    with ThreadPoolExecutor(1, thread_name_prefix="prepare") as executor:
        preparing = executor.submit(_prepare_local, raw, create_index, query, started)
        try:
            try:
                # What the first call of a worker reads: the first shard's, else the queries'.
                datasets = ("train",) if create_index else ("query",) * query
                if not later:
                    _refused_while_ray_starts(preparing)
                    connect(job_cfg.cluster)
                    ray_up = time.time()
                    spares = _early_workers(job_cfg, raw, preparing, datasets)
            except BaseException:
                preparing.result()  # a refused job fails with its refusal, not Ray's error
                raise
            job = preparing.result()
            if ray_up is not None:
                job.reached("ray", ray_up)
            elif later and query and _needs_ray(job):
                request_soon()  # Ray starts while the driver indexes
        except BaseException:
            if preparing.done() and not preparing.exception() and preparing.result()._local:
                preparing.result()._local.stop()
            stop_early(spares, ours)
            raise
    job._spares = spares
    return job


def _needs_ray(job: Job) -> bool:
    """Whether a job that scores, whose driver computes alone (its queries too:
    `pipeline.query_phi`), will need Ray: for a reducer too large for the driver, or
    damping=auto's choice."""
    return not job.reduces_in_driver() or job.cfg.precondition.damping == "auto"


def _refused_while_ray_starts(preparing: Future, poll_s: float = 0.05) -> None:
    """Wait while another thread of this process starts its Ray (the `jobs/` door holds
    `CONNECTING` meanwhile), but raise `preparing`'s refusal as soon as it fails: a job
    refused by its checks says so then, not once Ray is up (seconds later)."""
    while not CONNECTING.acquire(timeout=poll_s):
        if preparing.done() and preparing.exception() is not None:
            preparing.result()
    CONNECTING.release()


def _prepare_local(raw: dict[str, Any], create_index: bool, query: bool, started: float) -> Job:
    """`prepare`, and then, for an index that `local_shard.wanted`, the driver's own shards
    started on their way (`LocalShard`), computed while Ray and the workers start."""
    job, replica, train = _prepare(raw, create_index, query)
    job.started = started
    job.reached("prepared")
    if create_index and local_shard.wanted(job.cfg):
        committed = job.index.committed()
        plans = plan_shards(job.n_train, job.cfg.index.shard_size, committed)
        if plans:
            landing = job.progress.held()
            job._local = LocalShard(job.cfg, replica, train, job.index, plans, landing)
            job._member = job._local.member  # its pool starts one worker fewer
            job.progress.before_finish = partial(
                driver_shard.count_as_the_record_ends,
                job,
                job._local,
                len(plans) + len(committed),
                len(committed),
                sum(p.rows for p in plans),
            )
    return job


def _early_workers(
    job_cfg: JobConfig, raw: dict[str, Any], preparing: Future, datasets: tuple[str, ...]
) -> list[Any]:
    """Create the job's unstarted worker actors (Ray is up: `local_shard.ray_workers`),
    which build `datasets` meanwhile; none when the job names in-memory objects (shipped
    with the pool), `preparing` already failed, or the driver indexes alone
    (`local_shard.alone`)."""
    if assembly.in_memory_digests(raw) or (preparing.done() and preparing.exception()):
        return []
    if "train" in datasets and local_shard.alone(job_cfg):
        return []
    factory = worker_factory(job_cfg.cluster, raw, datasets=datasets)
    spares = [factory(i) for i in range(local_shard.ray_workers(job_cfg))]
    log.info("created %d worker actors while the job is checked", len(spares))
    return spares


def stop_early(spares: list[Any], ours: bool) -> None:
    """Undo `prepare_started`'s start-up: the actors, and Ray when it started it."""
    if ours and ray.is_initialized():
        ray.shutdown()  # stops every actor with it
        return
    for actor in spares:
        with suppress(Exception):  # one that already died
            ray.kill(actor, no_restart=True)
