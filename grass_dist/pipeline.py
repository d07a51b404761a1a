"""The driver: validate, plan shards, run the stages on Ray, report.

Every check that can fail (config, store, fingerprint) runs in `prepare`, before anything
is written to the store or any gradient is computed. The `jobs/` doors use `prepare_started`,
which starts Ray and the worker actors while `prepare` runs (and stops them when it
refuses the job); `prepare` alone never starts Ray.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
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
    unset_fields,
)
from grass_dist.config import JobConfig, resolve
from grass_dist.data.content import row_digest
from grass_dist.data.identity import check_committed_content, check_committed_rows
from grass_dist.fidelity import damping
from grass_dist.gradients.computer import PhiBlock
from grass_dist.gradients.learned_state import save_states
from grass_dist.index import GradientIndex
from grass_dist.models.state import state_hash
from grass_dist.runtime import local_shard, repair
from grass_dist.runtime.cluster import (
    connect,
    idle_cpus,
    map_tasks,
    start_worker_pool,
    worker_factory,
)
from grass_dist.runtime.executors import WorkersLostError
from grass_dist.runtime.local_shard import LocalShard
from grass_dist.runtime.pool import ActorPool
from grass_dist.runtime.progress import JobProgress
from grass_dist.runtime.reducer import ReducerHandle, ScoreRequest
from grass_dist.runtime.scheduler import run_items
from grass_dist.runtime.worker import ShardPlan, ShardResult, plan_shards
from grass_dist.scoring import results

log = logging.getLogger("grass_dist")
T = TypeVar("T")


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
    _spares: list[Any] = field(default_factory=list)  # unstarted worker actors (prepare_started)
    _pool: ActorPool | None = None
    _local: LocalShard | None = None  # the driver's own first shard (prepare_started)
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


def prepare(cfg: DictConfig | dict, *, create_index: bool = True, query: bool = False) -> Job:
    """Validate everything and open (or create) the index; no Ray, no gradients.

    The checks run in order of cost, and all of them before the first write to the store:
    config, model, task, data (non-empty, row 0 through the task and model; data.query too
    when `query` or configured), layers and compressors, then the store. Only then may
    learned masks be fitted.
    """
    return _prepare(cfg, create_index, query)[0]


def _prepare(cfg: DictConfig | dict, create_index: bool, query: bool) -> tuple[Job, tuple]:
    """`prepare`'s job, and the driver's (model, task, train data, compressors)."""
    raw = resolve(cfg)
    job_cfg = JobConfig.from_cfg(raw)
    model = build_model(job_cfg)
    task = build_task(job_cfg)
    train = build_dataset(job_cfg, "train")
    check_rows(job_cfg, model, task, train, "train")
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
    return job, (model, task, train, compressors)


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
    (Ray's processes die with the thread that started them, so Ray gets the caller's). The
    store is written only once every check passed, as by `prepare`; a refused job stops the
    actors, and a Ray started here, before its error is raised. `started` (time.time(),
    default now) is when the job started, for `Job.first_shard_s`.
    """
    started = time.time() if started is None else started
    raw = resolve(cfg)
    job_cfg = JobConfig.from_cfg(raw)
    if job_cfg.cluster.address is not None:
        # Joining a running cluster is quick, and a job submitted to one runs in a working
        # directory Ray manages for it: prepare first and connect later, as `prepare` does.
        job = prepare(raw, create_index=create_index, query=query)
        job.started = started
        return job
    ours = not ray.is_initialized()
    spares: list[Any] = []
    with ThreadPoolExecutor(1, thread_name_prefix="prepare") as executor:
        preparing = executor.submit(_prepare_local, raw, create_index, query, started)
        try:
            try:
                # What the first call of a worker reads: the first shard's, else the queries'.
                datasets = ("train",) if create_index else ("query",) * query
                spares = _early_workers(job_cfg, raw, preparing, datasets)
            except BaseException:
                preparing.result()  # a refused job fails with its refusal, not Ray's error
                raise
            job = preparing.result()
        except BaseException:
            if preparing.done() and not preparing.exception() and preparing.result()._local:
                preparing.result()._local.stop()
            _stop_early(spares, ours)
            raise
    job._spares = spares
    return job


def _prepare_local(raw: dict[str, Any], create_index: bool, query: bool, started: float) -> Job:
    """`prepare`, and then, for an index that `local_shard.wanted`, the driver's own first
    shard started on its way (`LocalShard`), computed while Ray and the workers start."""
    job, parts = _prepare(raw, create_index, query)
    job.started = started
    if create_index and local_shard.wanted(job.cfg):
        plans = plan_shards(job.n_train, job.cfg.index.shard_size, job.index.committed())
        if plans:
            job._local = LocalShard(job.cfg, parts, job.index, plans[0])
    return job


def _early_workers(
    job_cfg: JobConfig, raw: dict[str, Any], preparing: Future, datasets: tuple[str, ...]
) -> list[Any]:
    """Connect to Ray and create `cluster.num_workers` unstarted worker actors, which build
    `datasets` meanwhile; none when the job names in-memory objects (shipped with the pool)
    or `preparing` already failed."""
    connect(job_cfg.cluster)
    if assembly.in_memory_digests(raw) or (preparing.done() and preparing.exception()):
        return []
    factory = worker_factory(job_cfg.cluster, raw, datasets=datasets)
    spares = [factory(i) for i in range(job_cfg.cluster.num_workers)]
    log.info("created %d worker actors while the job is checked", len(spares))
    return spares


def _stop_early(spares: list[Any], ours: bool) -> None:
    """Undo `prepare_started`'s start-up: the actors, and Ray when it started it."""
    if ours and ray.is_initialized():
        ray.shutdown()  # stops every actor with it
        return
    for actor in spares:
        with suppress(Exception):  # one that already died
            ray.kill(actor, no_restart=True)


def _pool(job: Job) -> ActorPool:
    """The worker pool, started on first use (from the job's early actors when it has
    them); waits until one worker is ready (the others join as they are placed)."""
    if job._pool is None:
        connect(job.cfg.cluster)
        objects = assembly.ship(job.raw)  # in-memory model/task/data, once per pool
        spares, job._spares = job._spares, []
        job._pool = start_worker_pool(job.cfg.cluster, job.raw, job.model_hash, objects, spares)
        job._pool.wait_ready(1)
    return job._pool


def release_workers(job: Job) -> None:
    """Stop the worker pool (and unused early actors) so their CPUs/GPUs go to Ray tasks."""
    _stop_early(job._spares, ours=False)
    job._spares = []
    if job._pool is not None:
        job._pool.shutdown()
        job._pool = None


def _reducer(job: Job) -> ReducerHandle:
    if job._reducer is None:
        connect(job.cfg.cluster)
        job._reducer = ReducerHandle(job.cfg)
    return job._reducer


def run_index(
    job: Job, max_shards: int | None = None, precondition_next: bool = False
) -> dict[str, Any]:
    """Compute and commit every shard not yet committed (at most `max_shards` of them).

    With `precondition_next` (the job builds the preconditioner after the index) the
    reducer starts once the first shard is committed: its process starts (imports torch,
    opens the index) while the index builds, instead of after it, when the workers would
    wait for it. Where the workers leave CPUs idle its map tasks' processes start on them
    too; where they hold every CPU they are lent to the reducer's stages instead
    (`on_workers`).
    """
    local, job._local = job._local, None
    committed = job.index.committed()
    if local is not None:  # the driver's shard, committed or not, is this job's to compute
        committed.pop(local.plan.shard_id, None)
    plans = plan_shards(job.n_train, job.cfg.index.shard_size, committed)
    skipped = len(committed)
    if max_shards is not None:
        plans = plans[:max_shards]
    rows = sum(p.rows for p in plans)
    log.info(
        "index: %d shards to compute, skipping %d already committed (resume) in %s; progress in %s",
        len(plans),
        skipped,
        job.index.store.url_of(""),
        job.index.store.url_of(job.progress.path),
    )
    if not plans:
        if local is not None:  # max_shards=0
            local.stop()
        job.progress.index_plan(skipped, skipped, job.n_train, 0)
        return {"computed_shards": 0, "skipped_shards": skipped, "rows": 0, "driver_shards": 0}
    with job.stage("start_workers"):
        pool = _pool(job)
    with job.stage("index"):
        job.progress.index_plan(len(plans) + skipped, skipped, job.n_train, rows)
        driver = _DriverShard(job, local)
        reducer_early = precondition_next

        def commit(batch: list[tuple[ShardPlan, ShardResult]]) -> None:
            nonlocal reducer_early
            version = job.index.commit([res.record for _, res in batch])
            if job.first_shard_s is None:
                first_shard_committed(job)
            if reducer_early:  # after the workers' first shard: its start-up delays none
                reducer_early = False
                _reducer(job).start("started early, to be ready when the index is")
            done = ", ".join(f"{p.shard_id} (worker {r.worker_id})" for p, r in batch)
            log.debug("committed %s in manifest version %d", done, version)
            job.progress.shards_done(
                sum(p.rows for p, _ in batch), [res.node_id for _, res in batch]
            )
            driver.account()

        def on_tick() -> None:
            driver.account()
            job.progress.tick()

        def index(todo: list[ShardPlan]) -> None:
            run_items(
                pool,
                todo,
                lambda a, p: a.index_shard.remote(p),
                commit,
                describe=lambda p: f"shard {p.shard_id}",
                max_inflight=job.cfg.cluster.max_inflight_per_worker,
                max_retries=job.cfg.cluster.max_shard_retries,
                on_tick=on_tick,
            )

        index(driver.others(plans))
        index(driver.returned())  # the driver's shard, when it gave it back late
    return {
        "computed_shards": len(plans),
        "skipped_shards": skipped,
        "rows": rows,
        "driver_shards": int(driver.done),
    }


class _DriverShard:
    """The index stage's view of the driver's own shard (`LocalShard`, or None): which
    plans the workers take, and its commit counted in the job's first shard and progress
    (on the stage's thread, which owns them)."""

    def __init__(self, job: Job, local: LocalShard | None):
        self.job, self.local, self.done = job, local, False
        self.working = False  # the driver still works on its shard as the workers start
        self.account()

    def others(self, plans: list[ShardPlan]) -> list[ShardPlan]:
        """The workers' shards: all but the driver's, unless it already gave it back."""
        self.working = self.local is not None and not self.local.given_back()
        if not self.working:
            return plans
        return [p for p in plans if p.shard_id != self.local.plan.shard_id]

    def returned(self) -> list[ShardPlan]:
        """After the workers' shards: the driver's shard if it gave it back since `others`
        (it waits for the driver)."""
        if not self.working:
            return []  # none, or among the workers' shards
        if self.local.result() is None:
            return [self.local.plan]
        self.account()
        return []

    def account(self) -> None:
        """Count the driver's commit once it happened (first shard, progress)."""
        local = self.local
        if self.done or local is None or local.record is None:
            return
        self.done = True
        first = local.committed_at - self.job.started
        if self.job.first_shard_s is None or first < self.job.first_shard_s:
            first_shard_committed(self.job, first)
        node = ray.get_runtime_context().get_node_id()
        self.job.progress.shards_done(local.plan.rows, [node])


def first_shard_committed(job: Job, seconds: float | None = None) -> None:
    """Record (summary, progress record, log) how long the job took to commit its first
    shard (default: until now): the start-up cost a user waits for."""
    job.first_shard_s = time.time() - job.started if seconds is None else seconds
    job.progress.first_shard(job.first_shard_s)
    log.info("first shard committed %.2f s after the job started", job.first_shard_s)


def run_repair(job: Job) -> dict[str, Any]:
    """Check every committed shard; recompute and re-commit only the bad ones."""
    with job.stage("repair"):
        connect(job.cfg.cluster)
        committed, bad = repair.scan(job.index, map_tasks(job.cfg.cluster))
        log.info("repair: %d committed shards checked, %d bad", len(committed), len(bad))
        fixed = (
            repair.recompute(job.index, _pool(job), [committed[s] for s in bad], job.cfg.cluster)
            if bad
            else {}
        )
    return {"checked_shards": len(committed), "bad_shards": bad, "recomputed": fixed}


def lendable_workers(job: Job, tasks_only: bool = False) -> list[Any]:
    """The job's workers to lend to a reducer stage: the ready ones, when the pool's
    workers (ready or still starting) claim every CPU of the cluster, so that its Ray tasks
    would only wait for them to stop and then start new processes in their place; unless
    the stage needs tasks (`tasks_only`). Otherwise none, and the workers stop first so
    that the stage's tasks get their CPUs."""
    pool = job._pool
    if pool is not None and not tasks_only:
        pool.admit()  # a worker may have become ready after the last shard was handed out
        claimed = len(pool.actors) + len(pool.starting)
        if pool.actors and idle_cpus(job.cfg.cluster, claimed) < 1:
            return pool.actors
    release_workers(job)
    return []


def on_workers(job: Job, stage: Callable[[list[Any]], T], tasks_only: bool = False) -> T:
    """stage(workers): a reducer stage on the job's lent workers (`lendable_workers`); if
    one of them dies, the workers stop and the stage runs again on Ray tasks (it starts
    over from the store: the committed shards, the saved preconditioner)."""
    workers = lendable_workers(job, tasks_only)
    if workers:
        log.info("the %d idle workers run the stage's map calls", len(workers))
    try:
        return stage(workers)
    except WorkersLostError as e:
        if not workers:
            raise
        log.warning("%s", e)
        release_workers(job)
        return stage([])


def run_precondition(job: Job) -> dict[str, Any]:
    with job.stage("precondition"):
        p, verify = job.cfg.precondition, job.cfg.index.verify
        return on_workers(
            job, lambda lent: _reducer(job).precondition(p.name, verify, p.damping, lent)
        )


def query_phi(job: Job, which: str = "query") -> PhiBlock:
    """phi of every row of data.<which>, from the worker pool with the index's compressors."""
    n = len(build_dataset(job.cfg, which))
    chunk = job.cfg.index.shard_size
    spans = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    blocks: dict[tuple[int, int], PhiBlock] = {}
    with job.stage(f"{which}_gradients"):
        run_items(
            _pool(job),
            spans,
            lambda a, s: a.phi.remote(which, *s),
            blocks.update,
            describe=lambda s: f"{which} rows {s[0]}..{s[1]}",
            max_inflight=job.cfg.cluster.max_inflight_per_worker,
            max_retries=job.cfg.cluster.max_shard_retries,
        )
    parts = [blocks[s] for s in spans]
    return PhiBlock(
        np.concatenate([p.row_ids for p in parts]),
        [k for p in parts for k in p.keys],
        {name: np.concatenate([p.phi[name] for p in parts]) for name in parts[0].phi},
    )


def run_score(job: Job, query: PhiBlock | None = None) -> dict[str, Any]:
    """Score `query` (default: data.query) against the whole index; write results."""
    if query is None:
        query = query_phi(job)
    req = ScoreRequest.of(job.cfg)
    with job.stage("score"):
        return on_workers(
            job,
            lambda lent: _reducer(job).score(query, req, lent),
            tasks_only=req.fresh_process(len(query.row_ids)),
        )


def members_of(jobs: list[Job], queries: list[PhiBlock]) -> list[damping.Member]:
    return [
        damping.Member(
            j.index, damping.load_preconditioner(j.index, j.cfg.precondition.name), q, j.cfg
        )
        for j, q in zip(jobs, queries, strict=True)
    ]


def select_damping(jobs: list[Job], queries: list[PhiBlock], cfg: JobConfig) -> dict | None:
    """With damping=auto: choose delta for all `jobs` and set it on each; else None."""
    if cfg.precondition.damping != "auto":
        return None
    selection = damping.choose(members_of(jobs, queries), cfg, jobs[0].n_train)
    selection["validation"] = cfg.precondition.validation
    selection["validation_seed"] = cfg.precondition.validation_seed
    for job in jobs:
        job.cfg.precondition.damping = selection["chosen"]
    return selection


def record_selection(where: Any, name: str, selection: dict[str, Any]) -> None:
    """Add the damping choice to the summary of the complete result set `name`."""
    done = results.manifest(where, name)
    results.complete(
        where, name, done["files"], {**done["summary"], "damping_selection": selection}
    )


def score_stage(job: Job, query: PhiBlock) -> dict[str, Any]:
    """The scoring stage of every door: with precondition.damping=auto choose delta first
    (recorded in the result set's summary as `damping_selection`), then score `query`."""
    auto = job.cfg.precondition.damping == "auto"
    if auto:
        release_workers(job)  # the sweep's tasks need the workers' CPUs
    with job.stage("damping") if auto else nullcontext():
        selection = select_damping([job], [query], job.cfg)
    out: dict[str, Any] = {"score": run_score(job, query)}
    if selection is not None:
        record_selection(job.index, job.cfg.run.name, selection)
        out["damping"] = selection
    return out


def shutdown(job: Job) -> None:
    if job._local is not None:  # a job that ended before its index stage
        job._local.stop()
        job._local = None
    release_workers(job)
    if job._reducer is not None:
        job._reducer.shutdown()
        job._reducer = None
