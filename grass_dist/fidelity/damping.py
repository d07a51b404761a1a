"""precondition.damping=auto: choose delta from a grid without recomputing anything.

The preconditioner keeps H_l; eigendecomposed once (H_l = U diag(e) U^T, layers in parallel
map calls: Ray tasks, or the driver's own process for an index it reduces itself),
(H_l + lambda I)^-1 for any delta is U diag(1 / (e + lambda)) U^T: no second gradient pass
and no refactorisation per delta. A seeded validation split of the queries
(precondition.validation, 10 % by default) is preconditioned once per delta of
precondition.grid; one streaming pass over the index, as the same kind of map calls, scores
it against every training row for all deltas at once, and the best delta is used for the
held-out queries, where it is reported.

Objective:
- **LDS** when ground truth for the job's recipe exists (`python -m jobs.lds`): the mean
  Spearman correlation of sum_{i in S_j} tau(i, t) with the retrained outputs y_j(t).
- **Otherwise a proxy**: the share of each validation query's top `proxy_topk` proponents
  whose label is the query's label. It needs no retraining and no held-out loss, and it
  rewards damping that ranks training examples of the same class first -- a necessary
  (not sufficient) property of faithful attribution; it needs labelled data. The
  benchmark (bench/bench_lds.py) reports which delta it picks next to LDS's choice.

With an ensemble, members' LDS predictions are averaged before the Spearman (the
ensemble's own LDS); proxy values are averaged over members.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from grass_dist.build import IN_MEMORY, build_dataset, build_task
from grass_dist.config import JobConfig
from grass_dist.data import items
from grass_dist.errors import DampingSelectionError, GroundTruthError
from grass_dist.fidelity import ground_truth as gt_mod
from grass_dist.fidelity.metric import lds_from_predictions
from grass_dist.gradients.computer import PhiBlock
from grass_dist.index import GradientIndex, ShardRecord
from grass_dist.runtime.cluster import connect, map_tasks
from grass_dist.runtime.executors import Executor
from grass_dist.runtime.fisher import layer_map
from grass_dist.runtime.seeding import generator
from grass_dist.scoring.precondition import Preconditioner
from grass_dist.scoring.tiles import TopK, tile_scores

log = logging.getLogger(__name__)


def validation_split(n_query: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation rows, held-out rows) of n_query queries, both sorted and non-empty."""
    if n_query < 2:
        raise DampingSelectionError(
            f"precondition.damping=auto needs at least 2 queries (got {n_query}) to keep a "
            f"held-out split; add queries or set precondition.damping to a number"
        )
    order = torch.randperm(n_query, generator=generator(seed, "damping_validation")).numpy()
    n_val = min(n_query - 1, max(1, round(fraction * n_query)))
    return np.sort(order[:n_val]), np.sort(order[n_val:])


def stacked_queries(
    pre: Preconditioner, phi: dict[str, np.ndarray], grid: list[float], kind: str
) -> dict[str, np.ndarray]:
    """Queries (Q, k) preconditioned at every delta: (len(grid) * Q, k) per layer, delta-major."""
    per_delta = [pre.precondition_queries(phi, float(d), kind) for d in grid]
    return {n: np.concatenate([p[n] for p in per_delta]) for n in phi}


@dataclass
class SweepPartial:
    """What one pass over some shards returns: subset sums or top proponents per column."""

    sums: np.ndarray | None  # (m, columns) float64: sum over i in S_j of tau(i, column)
    top: TopK | None  # proponents of each column

    def merge(self, other: SweepPartial) -> SweepPartial:
        if self.sums is not None:
            return SweepPartial(self.sums + other.sums, None)
        return SweepPartial(None, self.top.merge(other.top))


def sweep_records(
    index: GradientIndex,
    records: list[ShardRecord],
    columns: dict[str, np.ndarray],
    masks: np.ndarray | None,
    topk: int,
    verify: bool = True,
) -> SweepPartial:
    """Score the rows of `records` against preconditioned query columns (C, k) per layer.

    Reads stored phi only. With `masks` (m, n_train) it folds the scores into subset sums
    masks[:, rows] @ scores (m, C); without, into the top-`topk` proponents per column.
    """
    q = {n: torch.tensor(np.asarray(x), dtype=torch.float32) for n, x in columns.items()}
    n_cols = next(iter(q.values())).shape[0]
    sums = np.zeros((masks.shape[0], n_cols)) if masks is not None else None
    top = TopK.empty(n_cols, topk, True) if masks is None else None
    for record in records:
        data = index.read(record, layers=list(q), verify=verify)
        scores = tile_scores({n: torch.tensor(x) for n, x in data.phi.items()}, q)
        if sums is not None:
            sums += masks[:, data.row_ids].astype(np.float64) @ scores.double().numpy()
        else:
            top.update(scores, torch.tensor(data.row_ids))
    return SweepPartial(sums, top)


def sweep(
    index: GradientIndex,
    columns: dict[str, np.ndarray],
    masks: np.ndarray | None,
    topk: int,
    parallelism: int,
    executor: Executor,
    verify: bool = True,
) -> SweepPartial:
    """`sweep_records` over every committed shard, fanned out as `executor`'s map calls
    (Ray tasks, or in this process for an index the driver reduces) and merged."""
    records = sorted(index.committed().values(), key=lambda r: r.start)
    groups = [records[i::parallelism] for i in range(min(parallelism, len(records)))]
    cols, kept = executor.share(columns), executor.share(masks)
    parts = executor.get(
        [
            executor.submit(i, sweep_records, index, g, cols, kept, topk, verify)
            for i, g in enumerate(groups)
        ]
    )
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    return merged


def _check_ground_truth(gt: gt_mod.GroundTruth, query: PhiBlock, n_train: int) -> None:
    if gt.query_keys != list(query.keys) or gt.masks.shape[1] != n_train:
        raise GroundTruthError(
            f"ground truth {gt.digest} was built for {len(gt.query_keys)} queries and "
            f"{gt.masks.shape[1]} training rows, but the job has {len(query.keys)} queries "
            f"and {n_train} rows (or other query keys); rebuild it with python -m jobs.lds"
        )


def _subset(phi: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {n: x[rows] for n, x in phi.items()}


class Member:
    """One attributed model: its index, preconditioner and query phi (an ensemble has C)."""

    def __init__(
        self,
        index: GradientIndex,
        pre: Preconditioner,
        query: PhiBlock,
        cfg: JobConfig,
        executor: Executor | None = None,
    ):
        self.index, self.pre, self.query, self.cfg = index, pre, query, cfg
        # Where its map calls run: Ray tasks, or this process where the driver reduces the
        # index (`Job.reduces_in_driver`), so a small job starts no task process for them.
        self.executor = executor or Executor()

    def predictions(
        self, rows: np.ndarray, grid: list[float], masks: np.ndarray | None, topk: int
    ) -> SweepPartial:
        """Subset sums (or top proponents) of query `rows` for every delta of `grid`."""
        cols = stacked_queries(self.pre, _subset(self.query.phi, rows), grid, self.cfg.scoring.kind)
        parallelism = map_tasks(self.cfg.cluster)
        return sweep(
            self.index, cols, masks, topk, parallelism, self.executor, self.cfg.index.verify
        )


def by_lds(
    members: list[Member],
    gt: gt_mod.GroundTruth,
    val: np.ndarray,
    test: np.ndarray,
    grid: list[float],
    n_boot: int,
) -> dict[str, Any]:
    """Choose delta by the (ensemble's) LDS on query rows `val`; report it on rows `test`."""
    q_val = len(val)
    sums = sum(m.predictions(val, grid, gt.masks, 1).sums for m in members) / len(members)
    values = [
        lds_from_predictions(sums[:, d * q_val : (d + 1) * q_val], gt.y[:, val], 0).mean
        for d in range(len(grid))
    ]
    best = best_delta(values, grid)
    held = sum(m.predictions(test, [best], gt.masks, 1).sums for m in members) / len(members)
    result = lds_from_predictions(held, gt.y[:, test], n_boot, seed=0)
    return {
        "objective": "lds",
        "ground_truth": gt.digest,
        "values": values,
        "chosen": best,
        "heldout": result.summary(),
    }


def _agreement(top: TopK, train_labels, query_labels, n_delta: int) -> list[float]:
    rows = top.rows.numpy()  # (n_delta * Q, topk)
    q = rows.shape[0] // n_delta
    hit = (train_labels[np.maximum(rows, 0)] == np.tile(query_labels, n_delta)[:, None]) & (
        rows >= 0
    )
    return [float(hit[d * q : (d + 1) * q].mean()) for d in range(n_delta)]


def _fixes(cfg: JobConfig) -> str:
    """What a user can do instead of the label proxy: jobs.lds builds ground truth for a
    recipe it can name (not for objects given to the Python API in memory)."""
    nodes = [cfg.model, *(cfg.data or {}).values()]
    named = all(isinstance(n, dict) and n.get("_target_") != IN_MEMORY for n in nodes)
    lds = "build ground truth with python -m jobs.lds, or " if named else ""
    return f"{lds}set precondition.damping to a number"


def check_class_labels(labels: dict[str, np.ndarray], cfg: JobConfig) -> None:
    """DampingSelectionError unless every label is a class (a whole number, or not a float):
    the proxy compares labels for equality, which regression targets never are."""
    for which, values in labels.items():
        if np.issubdtype(values.dtype, np.floating) and not np.all(np.mod(values, 1) == 0):
            raise DampingSelectionError(
                f"precondition.damping=auto found no LDS ground truth for this recipe, and "
                f"the label proxy needs class labels, but {which}'s labels are not whole "
                f"numbers (e.g. {values[np.mod(values, 1) != 0][0]:g}; regression targets?): "
                f"{_fixes(cfg)}"
            )


def check_proxy_signal(values: list[float], n_val: int, topk: int) -> None:
    """DampingSelectionError when no delta's proponents carried any query's label: no signal
    to choose by (a tie elsewhere goes to the larger delta, as `best_delta` says)."""
    if any(values):
        return
    raise DampingSelectionError(
        f"precondition.damping=auto: at no delta of precondition.grid did any of the "
        f"{n_val} validation queries' top {topk} proponents carry its label, so the label "
        "proxy cannot choose: raise precondition.validation (more validation queries), "
        "build ground truth with python -m jobs.lds, or set precondition.damping to a number"
    )


def by_proxy(
    members: list[Member],
    cfg: JobConfig,
    val: np.ndarray,
    test: np.ndarray,
    grid: list[float],
    topk: int,
) -> dict[str, Any]:
    """Choose delta by top-`topk` proponent label agreement on `val`; report it on `test`."""
    train_labels = items.labels(build_dataset(cfg, "train"))
    query_labels = items.labels(build_dataset(cfg, "query"))
    if train_labels is None or query_labels is None:
        which = "data.train" if train_labels is None else "data.query"
        if getattr(build_task(cfg), "spec", dict)().get("task") == "causal_lm":
            raise DampingSelectionError(
                "precondition.damping=auto needs class labels (the label proxy) or LDS ground "
                "truth, and a language model (task causal_lm) has neither: jobs.lds retrains "
                "classifiers only. Set precondition.damping to a number (e.g. 0.1; "
                "docs/language_models.md)"
            )
        raise DampingSelectionError(
            f"precondition.damping=auto found no LDS ground truth for this recipe and {which} "
            "has no class labels for the proxy (it needs one scalar label per row: (input, "
            f"label) pairs, dicts with a scalar label field, or a dataset `labels`): "
            f"{_fixes(cfg)}"
        )

    def agreement(rows: np.ndarray, deltas: list[float]) -> np.ndarray:
        tops = [m.predictions(rows, deltas, None, topk).top for m in members]
        per_member = [_agreement(t, train_labels, query_labels[rows], len(deltas)) for t in tops]
        return np.mean(per_member, axis=0)

    check_class_labels({"data.train": train_labels, "data.query": query_labels}, cfg)
    values = agreement(val, grid).tolist()
    check_proxy_signal(values, len(val), topk)
    best = best_delta(values, grid)
    held = float(agreement(test, [best])[0])
    name = f"label_agreement@{topk}"
    return {"objective": name, "values": values, "chosen": best, "heldout": {name: held}}


def best_delta(values: list[float], grid: list[float]) -> float:
    """The delta with the best value; NaN never wins, ties go to the larger delta (stabler)."""
    finite = [(v, d) for v, d in zip(values, grid, strict=True) if np.isfinite(v)]
    if not finite:
        raise DampingSelectionError(
            f"every delta of precondition.grid={grid} gave an undefined objective; widen the "
            f"grid or add validation queries (precondition.validation)"
        )
    return float(max(finite)[1])


def choose(members: list[Member], cfg: JobConfig, n_train: int) -> dict[str, Any]:
    """Pick delta for `members` (one model, or an ensemble) on the validation queries.

    `cfg` is the job's config (for an ensemble, the base model's: its ground truth is the
    one looked up). Returns a JSON-able summary: objective, grid, per-delta validation
    values, the chosen delta and the objective on the held-out queries at that delta.
    """
    p = cfg.precondition
    connect(cfg.cluster)
    val, test = validation_split(len(members[0].query.keys), p.validation, p.validation_seed)
    for member in members:  # one eigendecomposition serves every delta of the grid
        member.pre.eigendecompose(layer_map(map_tasks(cfg.cluster), member.executor))
    gt = gt_mod.lookup(cfg)
    grid = [float(d) for d in p.grid]
    if gt is not None:
        _check_ground_truth(gt, members[0].query, n_train)
        log.info("damping=auto: choosing by LDS on the ground truth at %s", gt_mod.location(cfg))
        out = by_lds(members, gt, val, test, grid, cfg.lds.bootstrap)
    else:
        log.info(
            "damping=auto: no LDS ground truth at %s, where `jobs.lds` with this job's model, "
            "data, task and lds.* settings (lds.train included) would build it; choosing by "
            "the label proxy",
            gt_mod.location(cfg),
        )
        out = by_proxy(members, cfg, val, test, grid, p.proxy_topk)
    log.info("damping=auto chose delta=%g by %s", out["chosen"], out["objective"])
    return {"grid": grid, "validation_queries": len(val), "heldout_queries": len(test), **out}
