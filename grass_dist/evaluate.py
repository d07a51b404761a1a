"""Fidelity in the jobs: LDS of result sets, damping=auto before scoring, ensembles.

- `lds(cfg)` (`python -m jobs.lds`): build or load the LDS ground truth of the job's
  recipe, then evaluate every named result set that has dense scores; the evaluation is
  written to `results/<name>/lds.json` next to the scores.
- `score_stage(job, query)`: the scoring stage of jobs.attribute / jobs.score; with
  precondition.damping=auto it first chooses delta (grass_dist.damping) and records the
  choice in the result set's summary (`damping_selection`).
- `attribute_ensemble(raw)`: every stage for each ensemble member, one damping for all,
  then the averaged result set (grass_dist.ensemble).
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from omegaconf import DictConfig

from grass_dist import damping, ensemble, pipeline, results
from grass_dist.build import build_dataset, store_retry
from grass_dist.config import JobConfig, resolve
from grass_dist.errors import GrassError, GroundTruthError, ResultsNotFoundError
from grass_dist.gradients import PhiBlock
from grass_dist.index import Store
from grass_dist.lds import ground_truth
from grass_dist.lds.metric import lds_from_predictions
from grass_dist.runtime.cluster import connect

log = logging.getLogger("grass_dist")


def record_selection(where: Any, name: str, selection: dict[str, Any]) -> None:
    """Add the damping choice to the summary of the complete result set `name`."""
    done = results.manifest(where, name)
    results.complete(
        where, name, done["files"], {**done["summary"], "damping_selection": selection}
    )


def members_of(jobs: list[pipeline.Job], queries: list[PhiBlock]) -> list[damping.Member]:
    return [
        damping.Member(
            j.index, damping.load_preconditioner(j.index, j.cfg.precondition.name), q, j.cfg
        )
        for j, q in zip(jobs, queries, strict=True)
    ]


def _select(jobs: list[pipeline.Job], queries: list[PhiBlock], cfg: JobConfig) -> dict | None:
    """With damping=auto: choose delta for all `jobs` and set it on each; else None."""
    if cfg.precondition.damping != "auto":
        return None
    selection = damping.choose(members_of(jobs, queries), cfg, jobs[0].n_train)
    selection["validation"] = cfg.precondition.validation
    selection["validation_seed"] = cfg.precondition.validation_seed
    for job in jobs:
        job.cfg.precondition.damping = selection["chosen"]
    return selection


def score_stage(job: pipeline.Job, query: PhiBlock) -> dict[str, Any]:
    """Score `query` (choosing the damping first when it is 'auto'): summary entries."""
    auto = job.cfg.precondition.damping == "auto"
    with job.stage("damping") if auto else nullcontext():
        selection = _select([job], [query], job.cfg)
    out: dict[str, Any] = {"score": pipeline.run_score(job, query)}
    if selection is not None:
        record_selection(job.index, job.cfg.run.name, selection)
        out["damping"] = selection
    return out


def attribute_ensemble(raw: dict[str, Any]) -> dict[str, Any]:
    """Index, precondition and score every member, then average into the run's result set."""
    cfg = JobConfig.from_cfg(raw)
    jobs: list[pipeline.Job] = []
    queries: list[PhiBlock] = []
    members: list[dict[str, Any]] = []
    try:
        for member in ensemble.member_configs(raw, cfg):
            job = pipeline.prepare(member)
            jobs.append(job)
            summary = {"index_url": job.cfg.index_url, "index": pipeline.run_index(job)}
            queries.append(pipeline.query_phi(job))
            pipeline.release_workers(job)
            summary["precondition"] = pipeline.run_precondition(job)
            members.append(summary)
        selection = _select(jobs, queries, cfg)
        for job, query, summary in zip(jobs, queries, members, strict=True):
            summary["score"] = pipeline.run_score(job, query)
    finally:
        for job in jobs:
            pipeline.shutdown(job)
    root = ensemble.ArtifactDir(Store(cfg.index_url, cfg.store.storage_options, store_retry(cfg)))
    name = cfg.run.name
    out: dict[str, Any] = {"members": members}
    out["ensemble"] = ensemble.average(
        [j.index for j in jobs], name, root, cfg.scoring.topk, build_dataset(cfg, "train")
    )
    if selection is not None:
        record_selection(root, name, selection)
        out["damping"] = selection
    return out


def predictions_of(where: Any, name: str, gt: ground_truth.GroundTruth) -> np.ndarray:
    """yhat (m, Q) = masks @ dense scores of result set `name`, streamed part by part."""
    done = results.manifest(where, name)
    if "dense" not in done["files"]:
        raise ResultsNotFoundError(
            f"results {name!r} have no dense scores, which LDS needs: rerun the attribution "
            f"with scoring.dense=true"
        )
    topk = results.load_table(where, name, "topk")
    keys = dict(zip(topk["query_row"].to_pylist(), topk["query_key"].to_pylist(), strict=True))
    if [keys.get(q) for q in range(len(gt.query_keys))] != gt.query_keys:
        raise GroundTruthError(
            f"results {name!r} were scored for other queries than ground truth {gt.digest} "
            f"({len(keys)} vs {len(gt.query_keys)} queries): use the same data.query"
        )
    yhat = np.zeros_like(gt.y)
    for rel in done["files"]["dense"]:
        table = pq.read_table(io.BytesIO(where.get_artifact(rel)))
        rows = table["train_row"].to_numpy()
        scores = table["scores"].combine_chunks().flatten().to_numpy().reshape(len(rows), -1)
        yhat += gt.masks[:, rows].astype(np.float64) @ scores.astype(np.float64)
    return yhat


def evaluate_results(
    where: Any, name: str, gt: ground_truth.GroundTruth, n_boot: int
) -> dict[str, Any]:
    """LDS of result set `name` on all queries, and on the held-out ones if delta was chosen."""
    yhat = predictions_of(where, name, gt)
    summary = results.manifest(where, name)["summary"]
    full = lds_from_predictions(yhat, gt.y, n_boot)
    out: dict[str, Any] = {"damping": summary.get("damping"), "all_queries": full.summary()}
    selection = summary.get("damping_selection")
    if selection is not None:
        _, test = damping.validation_split(
            len(gt.query_keys), selection["validation"], selection["validation_seed"]
        )
        out["heldout_queries"] = lds_from_predictions(
            yhat[:, test], gt.y[:, test], n_boot
        ).summary()
    record = {**out, "ground_truth": gt.digest, "per_query": full.per_query.tolist()}
    where.put_artifact(f"{results.results_dir(name)}/lds.json", json.dumps(record).encode())
    return out


def lds(cfg: DictConfig | dict) -> dict[str, Any]:
    """jobs.lds: ensure the ground truth, then evaluate lds.results (default [run.name])."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    try:
        raw = resolve(cfg)
        job = JobConfig.from_cfg(raw)
        if ground_truth.lookup(job) is None:
            ground_truth.check_buildable(job)  # a bad recipe is refused before Ray starts
        connect(job.cluster)
        gt, built = ground_truth.ensure(job, raw)
        where = ensemble.ArtifactDir(
            Store(job.index_url, job.store.storage_options, store_retry(job))
        )
        evaluations = {}
        for name in job.lds.results or [job.run.name]:
            try:
                evaluations[name] = evaluate_results(where, name, gt, job.lds.bootstrap)
            except ResultsNotFoundError as e:
                log.warning("LDS of %s skipped: %s", name, e)
                evaluations[name] = {"skipped": str(e)}
    except GrassError as e:
        cause = getattr(e, "cause", None)
        print(f"error: {cause if isinstance(cause, GrassError) else e}", file=sys.stderr)
        sys.exit(2)
    summary = {
        "ground_truth": {
            "digest": gt.digest,
            "url": ground_truth.lds_store(job).url_of(gt.digest),
            "built_now": built,
            "subsets": int(gt.masks.shape[0]),
            "seeds": int(gt.y_seeds.shape[0]),
            "queries": int(gt.y.shape[1]),
            "train_seconds": gt.spec.get("train_seconds"),
        },
        "results": evaluations,
        "total_seconds": round(time.perf_counter() - t0, 3),
    }
    print(json.dumps(summary, indent=2, default=str))
    return summary
