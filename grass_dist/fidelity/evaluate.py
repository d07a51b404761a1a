"""Fidelity in the jobs: LDS of result sets and ensembles.

- `lds(raw)` (`python -m jobs.lds`): build or load the LDS ground truth of the job's
  recipe, then evaluate every named result set that has dense scores; the evaluation is
  written to `results/<name>/lds.json` next to the scores.
- `attribute_ensemble(raw)`: every stage for each ensemble member, one damping for all
  (grass_dist.pipeline.select_damping), then the averaged result set (grass_dist.scoring.ensemble).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from omegaconf import DictConfig

from grass_dist import assembly, pipeline
from grass_dist.build import build_dataset
from grass_dist.config import JobConfig, resolve
from grass_dist.errors import GroundTruthError, ResultsNotFoundError
from grass_dist.fidelity import damping, ground_truth
from grass_dist.fidelity.metric import lds_from_predictions
from grass_dist.gradients.computer import PhiBlock
from grass_dist.runtime.cluster import connect
from grass_dist.scoring import ensemble, results

log = logging.getLogger("grass_dist")


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
            built = pipeline.run_index(job, precondition_next=True)
            summary = {"index_url": job.cfg.index_url, "index": built}
            queries.append(pipeline.query_phi(job))
            pipeline.release_workers(job)
            summary["precondition"] = pipeline.run_precondition(job)
            members.append(summary)
        selection = pipeline.select_damping(jobs, queries, cfg)
        for job, query, summary in zip(jobs, queries, members, strict=True):
            summary["score"] = pipeline.run_score(job, query)
    finally:
        for job in jobs:
            pipeline.shutdown(job)
    root = results.ArtifactDir(assembly.open_store(cfg))
    name = cfg.run.name
    out: dict[str, Any] = {"members": members}
    out["ensemble"] = ensemble.average(
        [j.index for j in jobs], name, root, cfg.scoring.topk, build_dataset(cfg, "train")
    )
    if selection is not None:
        pipeline.record_selection(root, name, selection)
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
        table = results.read_table(where, rel, name)
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


def check_named_results(where: Any, names: list[str]) -> None:
    """Refuse `lds.results` none of which is a complete result set with dense scores: its
    LDS could only be skipped, after the ground truth's retraining. (With lds.results unset,
    `jobs.lds` may run first, only to build the ground truth that damping=auto reads.)"""
    why = {}
    for name in names:
        try:
            if "dense" not in results.manifest(where, name)["files"]:
                why[name] = "no dense scores (score with scoring.dense=true)"
        except ResultsNotFoundError as e:
            why[name] = str(e)
    if len(why) == len(names):
        said = "; ".join(f"{name!r}: {reason}" for name, reason in why.items())
        raise ResultsNotFoundError(
            f"lds.results={list(names)} names no result set this job can evaluate ({said}). "
            f"Fix: name result sets that python -m jobs.attribute scoring.dense=true wrote "
            f"(run.name), or leave lds.results unset to build the ground truth alone"
        )


def lds(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """jobs.lds: ensure the ground truth, then evaluate lds.results (default [run.name])."""
    raw = resolve(cfg)
    job = JobConfig.from_cfg(raw)
    where = results.ArtifactDir(assembly.open_store(job))
    if job.lds.results:
        check_named_results(where, job.lds.results)  # before retraining, not after it
    if ground_truth.lookup(job) is None:
        ground_truth.check_buildable(job)  # a bad recipe is refused before Ray starts
    connect(job.cluster)
    gt, built = ground_truth.ensure(job, raw)
    evaluations = {}
    for name in job.lds.results or [job.run.name]:
        try:
            evaluations[name] = evaluate_results(where, name, gt, job.lds.bootstrap)
        except ResultsNotFoundError as e:
            log.warning("LDS of %s skipped: %s", name, e)
            evaluations[name] = {"skipped": str(e)}
    return {
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
    }
