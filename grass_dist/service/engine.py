"""The query engine behind the service: new examples in, top-k training rows out.

It loads one model replica and the index's preconditioner once, checks that the index was
built with exactly the compressors this config builds (its fingerprint), and computes each
request's query gradients with GradientComputer, the same code the index was built with.
The train phi stays in memory when it fits `serve.cache_bytes`; otherwise every request
streams the shards (through Ray scorer tasks when Ray is up).

With precondition.damping=auto the service serves the delta that the batch job chose and
recorded in the summary of result set run.name (`damping_selection`, see
grass_dist.fidelity.evaluate), so its influence scores are the batch job's; without a recorded
choice it refuses to start.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from grass_dist import assembly
from grass_dist.build import build_dataset, fingerprint
from grass_dist.config import JobConfig
from grass_dist.errors import (
    BadRequestError,
    BadRowsError,
    ConfigError,
    CorruptPreconditionerError,
    DampingNotChosenError,
    NonFiniteGradientError,
    ResultsNotFoundError,
)
from grass_dist.gradients.computer import GradientComputer
from grass_dist.index import GradientIndex, ShardRecord
from grass_dist.runtime.fisher import fisher_source
from grass_dist.runtime.reducer import preconditioner_path, read_preconditioner
from grass_dist.runtime.scoring import ScoreOptions, fan_out, score_records
from grass_dist.scoring import results
from grass_dist.scoring.precondition import Preconditioner
from grass_dist.scoring.score import (
    KINDS,
    Block,
    ScorePartial,
    concat,
    keys_of_rows,
    prepare_queries,
    row_norms,
    score_stream,
)
from grass_dist.scoring.topk import decode
from grass_dist.service.codec import decodable, decode_like

log = logging.getLogger(__name__)
BUILD_PRECONDITIONER = (
    "run `python -m jobs.score` with this config (it builds the preconditioner from the "
    "shards committed now) and restart the service"
)
# What a request's examples can make the loss raise: a 422 naming them, not a 500.
_UNFIT = (BadRowsError, NonFiniteGradientError, IndexError, ValueError, RuntimeError)


def _said(e: BaseException) -> str:
    """What went wrong in a request's examples, in their terms: a BadRowsError's cause (its
    own words number the rows of a batch, which the client never saw), else `e`."""
    if isinstance(e, BadRowsError) and e.__cause__ is not None:
        cause = e.__cause__
        return f"{type(cause).__name__}: {str(cause).strip().rstrip('.')}"
    return str(e).strip().rstrip(".")


def example_decoder(job: JobConfig, task, template: Any) -> Callable[[Any, Any], Any]:
    """How request examples become dataset items: the task's `decode_example(example,
    template)`, else examples shaped like the training items (codec.decode_like: dicts
    with numeric fields, or (input, label) pairs); ConfigError for a task with neither."""
    if hasattr(task, "decode_example"):
        return task.decode_example
    if decodable(template):
        return decode_like
    raise ConfigError(
        f"task {job.task['_target_']} has no decode_example(example, template), and its "
        f"training items ({type(template).__name__}) are neither dicts of tensors nor "
        f"(input, label) pairs that a request example could be shaped like: implement "
        f"decode_example to turn request examples into dataset items"
    )


def open_checked(job: JobConfig, train) -> tuple[GradientIndex, assembly.Replica]:
    """The job's index and a replica assembled as the workers assemble theirs (learned
    compressors loaded from the index), refusing an index built with another
    model/compressor/data fingerprint."""
    index = assembly.open_index(job)  # IndexNotFoundError rather than creating
    parts = assembly.replica(job, index)
    assembly.checked_index(job, fingerprint(job, parts.model, parts.compressors, parts.task, train))
    return index, parts


def served_damping(job: JobConfig, index: GradientIndex) -> float:
    """The relative damping delta of influence queries: precondition.damping, or for 'auto'
    the delta the batch job chose for result set run.name (DampingNotChosenError if none)."""
    p = job.precondition
    if p.damping != "auto":
        return float(p.damping)
    try:
        selection = results.manifest(index, job.run.name)["summary"].get("damping_selection")
    except ResultsNotFoundError:
        selection = None
    if selection is None:
        raise DampingNotChosenError(
            f"precondition.damping=auto, but result set run.name={job.run.name!r} of "
            f"{job.index_url} records no damping choice to serve: run `python -m "
            f"jobs.attribute precondition.damping=auto run.name={job.run.name}` with this "
            f"config first, or set precondition.damping to a number"
        )
    delta = float(selection["chosen"])
    log.info(
        "precondition.damping=auto: serving delta=%g, chosen by %s for result set %r",
        delta,
        selection.get("objective"),
        job.run.name,
    )
    return delta


@dataclass
class TrainCache:
    """Every committed train row in memory: rows (n,) sorted, keys, phi (n, K) float32 and
    the rows' norms (n,) float64 (for cosine scores)."""

    rows: np.ndarray
    keys: pa.Array
    phi: torch.Tensor
    norms: torch.Tensor

    @classmethod
    def load(cls, index: GradientIndex, layers: list[str], verify: bool) -> TrainCache:
        rows, keys, parts = [], [], []
        for _, data in index.iter_committed(layers, verify):
            rows.append(data.row_ids)
            keys.extend(data.keys)
            parts.append(concat(data.phi))
        order = np.argsort(np.concatenate(rows), kind="stable")
        phi = torch.cat(parts)[torch.from_numpy(order)]
        keys = pa.array(keys, pa.string()).take(order)
        return cls(np.concatenate(rows)[order], keys, phi, row_norms(phi))

    def key_of(self, rows: np.ndarray) -> list[str]:
        return keys_of_rows((self.rows, self.keys), rows)[1].to_pylist()


class QueryEngine:
    """One replica's state: model, compressors, preconditioner, optional train cache.

    `probe` builds the pre-deploy check's engine: nothing cached, and queries score the
    first committed shard only, so the check runs every step of a request (decode, query
    gradients, preconditioning, scoring, keys) without a pass over the whole index.
    """

    def __init__(self, job: JobConfig, probe: bool = False):
        self.job = job
        train = build_dataset(job, "train")
        self.index, parts = open_checked(job, train)
        self.task = parts.task
        self.computer = GradientComputer(parts.model, parts.task, parts.compressors)
        self.template = train[0]
        self._decode = example_decoder(job, parts.task, self.template)
        self.layers = [name for name, _ in self.index.layers]
        self.records = sorted(self.index.committed().values(), key=lambda r: r.start)
        self.pre, self.unavailable = self._preconditioner(self.records)
        if probe:
            self.records = self.records[:1]
        self.n_train = sum(r.rows for r in self.records)
        # Only influence uses the damping, and only an index with a preconditioner offers it.
        self.damping = served_damping(job, self.index) if self.pre is not None else None
        if self.pre is not None:
            # Factorise at the served damping now (a no-op when the stored factor is at that
            # delta), so the first influence query does not pay for it.
            self.pre.factorise(self.damping)
        width = sum(k for _, k in self.index.layers)
        self.cache = None
        if not probe and self.n_train * width * 4 <= job.serve.cache_bytes:
            t0 = time.perf_counter()
            self.cache = TrainCache.load(self.index, self.layers, job.index.verify)
            log.info("cached %d train rows in %.2f s", self.n_train, time.perf_counter() - t0)

    def _preconditioner(self, records: list[ShardRecord]) -> tuple[Preconditioner | None, str]:
        """The index's preconditioner, if it was summed from the shards committed now; else
        None and why (a preconditioner from fewer shards would give other scores than the
        batch job, which rebuilds it)."""
        name = self.job.precondition.name
        path = preconditioner_path(name)
        if not self.index.has_artifact(path):
            return None, f"the index has no preconditioner {name!r}"
        try:
            pre = read_preconditioner(self.index, name)
        except CorruptPreconditionerError as exc:  # the batch job builds it again
            return None, str(exc)
        rows = sum(r.rows for r in records)
        # A preconditioner written before sources were recorded is known by its rows alone.
        if (pre.source == fisher_source(records)) if pre.source else (pre.n == rows):
            return pre, ""
        return None, (
            f"the index's preconditioner {name!r} was summed from other shards than those "
            f"committed now ({pre.n} rows; the index holds {rows}), so its influence scores "
            f"would not be the batch job's"
        )

    def info(self) -> dict[str, Any]:
        return {
            "train_rows": self.n_train,
            "layers": self.layers,
            "cached": self.cache is not None,
            "kinds": [k for k in KINDS if k != "influence"]
            + (["influence"] if self.pre is not None else []),
        }

    def decode(self, examples: list) -> list:
        """Request examples -> dataset items (BadRequestError 422 naming the example)."""
        items = []
        for i, example in enumerate(examples):
            try:
                items.append(self._decode(example, self.template))
            except BadRequestError as e:
                sep = "." if re.match(r"\w+: ", e.message) else ": "  # a field's message
                raise BadRequestError(f"examples[{i}]{sep}{e.message}", e.status) from None
        return items

    def query(self, items: list, topk: int, kind: str) -> list[dict[str, Any]]:
        """Top-k proponents and opponents of each item among all committed train rows."""
        if kind == "influence" and self.pre is None:
            raise BadRequestError(
                f"kind 'influence' is unavailable: {self.unavailable}. Use grad_dot or "
                f"cosine, or {BUILD_PRECONDITIONER}",
                409,
            )
        try:
            phi = self._phi(items)
        except _UNFIT as e:
            bad = self._unfit(items) if len(items) > 1 else [0]
            which = f"examples {bad}" if bad else "these examples"
            raise BadRequestError(
                f"could not compute the loss of {which}: {_said(e)}. Check them against the "
                f"model and the task (shapes and types like the training items', labels within "
                f"the model's classes)",
                422,
            ) from e
        query = prepare_queries(phi, kind, self.pre, self.damping or 0.0)
        partial = self._score(query, min(topk, max(1, self.n_train)))
        return self._answer(partial, len(items))

    def _phi(self, items: list) -> dict[str, Any]:
        return self.computer.phi_rows(items, range(len(items)), self.job.index.batch_size).phi

    def _unfit(self, items: list) -> list[int]:
        """The examples whose loss fails alone (after their batch failed): the error path
        only, so a request's bad examples are named rather than its whole batch."""
        bad = []
        for i, item in enumerate(items):
            try:
                self._phi([item])
            except _UNFIT:
                bad.append(i)
        return bad

    def _score(self, query, topk: int) -> ScorePartial:
        # A few queries make thin tiles: widen them so a request costs a handful of GEMMs.
        tile_rows = max(self.job.scoring.tile_rows, (1 << 22) // query.n_query)
        if self.cache is not None:
            block = Block(self.cache.rows, [], self.cache.phi, norms=self.cache.norms)
            return score_stream(query, lambda: [block], topk, tile_rows, expected_rows=self.n_train)
        opts = ScoreOptions(topk, tile_rows, self.job.index.verify, self.job.scoring.cpus_per_task)
        free = 0
        if ray.is_initialized():
            free = int(ray.available_resources().get("CPU", 0) // opts.cpus_per_task)
        if free < 1:
            # No Ray, or no CPU free for a scorer task: replicas that hold every CPU of the
            # cluster (serve.replicas=2 on 2 CPUs) would wait for one forever. The replica
            # scores the shards itself, on its own CPUs.
            return score_records(self.index, self.records, query, opts)[0]
        parallelism = self.job.scoring.parallelism or free
        return fan_out(self.index, self.records, query, opts, parallelism)[0]

    def _answer(self, partial: ScorePartial, n: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{} for _ in range(n)]
        for label, keys, sign in (
            ("proponents", partial.proponents, 1),
            ("opponents", partial.opponents, -1),
        ):
            values, rows = (x.numpy() for x in decode(keys, sign))
            names = self._keys(rows[rows >= 0], partial)
            it = iter(names)
            for q in range(n):
                keep = rows[q] >= 0
                out[q][label] = [
                    {"train_row": int(r), "train_key": next(it), "score": float(v)}
                    for r, v in zip(rows[q][keep], values[q][keep], strict=True)
                ]
        return out

    def _keys(self, rows: np.ndarray, partial: ScorePartial) -> list[str]:
        if partial.train_keys is None:  # scored from the cache, which holds every key
            return self.cache.key_of(rows)
        # The answered rows' keys, which the scorers kept as they read the shards.
        return keys_of_rows(partial.train_keys, rows)[1].to_pylist()
