"""What the `jobs/` entry points run: stage sequences with timing, report and a summary."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from grass_dist import assembly, pipeline
from grass_dist.build import (
    build_dataset,
    build_model,
    build_task,
    check_arguments,
    locate_target,
)
from grass_dist.config import JobConfig, resolve
from grass_dist.data.identity import MarkChanged, changed_rows
from grass_dist.errors import ConfigError, GrassError, IndexNotFoundError
from grass_dist.fidelity import evaluate
from grass_dist.index import GradientIndex, Store
from grass_dist.index.gc import collect
from grass_dist.index.gradient_index import INDEX_FILE
from grass_dist.launch import answer, exit_interrupted, job_start, refuse
from grass_dist.scoring import ensemble, results
from grass_dist.summary import job_summary

log = logging.getLogger("grass_dist")


def _predictions(job: pipeline.Job, dataset) -> dict[int, Any]:
    """Row -> the task's `predict` (a class id, or a regression task's float); {} without."""
    task = build_task(job.cfg)
    if not hasattr(task, "predict"):
        return {}
    model = build_model(job.cfg).eval()
    out: dict[int, Any] = {}
    for lo in range(0, len(dataset), 256):
        rows = range(lo, min(lo + 256, len(dataset)))
        batch = task.collate([dataset[i] for i in rows])
        out.update(zip(rows, task.predict(model, batch).tolist(), strict=True))
    return out


def make_report(job: pipeline.Job) -> dict[str, Any]:
    """Write the HTML report next to the results (and locally when the store is remote)."""
    from grass_dist import report  # pandas: imported here, off the jobs' start-up path

    name = job.cfg.run.name
    topk = results.load_table(job.index, name, "topk").to_pandas()
    files = results.manifest(job.index, name)["files"]
    self_inf = (
        results.load_table(job.index, name, "self_influence").to_pandas()
        if "self_influence" in files
        else None
    )
    train, query = build_dataset(job.cfg, "train"), build_dataset(job.cfg, "query")
    preds = _predictions(job, query)
    changed = _changed_shown_rows(job.index, train, topk, self_inf)
    shown_train = MarkChanged(train, changed) if changed else train
    html = report.write_report(
        None,
        topk,
        shown_train,
        query,
        self_influence=self_inf,
        stage_times=job.timings,
        predictions=preds,
    )
    job.index.put_artifact(f"{results.results_dir(name)}/report.html", html.encode())
    local = os.path.join(job.cfg.run.output_dir, f"report-{name}.html")
    os.makedirs(job.cfg.run.output_dir, exist_ok=True)
    with open(local, "w", encoding="utf-8") as f:
        f.write(html)
    # The report's summary states the same numbers, computed by the same function.
    labels = report.label_stats(topk, shown_train, query, preds)
    return {
        "report": os.path.abspath(local),
        "top_proponent_label_agreement": labels.agreement,
        "top_proponent_label_agreement_correct": labels.agreement_correct,
        "query_accuracy": labels.accuracy,
        "changed_train_rows": changed,
    }


def _changed_shown_rows(index: GradientIndex, train, topk, self_inf) -> list[int]:
    """Training rows the report shows whose content changed since they were indexed."""
    from grass_dist import report  # pandas, as in make_report

    shown = set(topk["train_row"].tolist())
    if self_inf is not None:
        most = self_inf.nlargest(report.N_SELF_INFLUENCE, "self_influence")
        shown |= set(most["train_row"].tolist())
    changed = changed_rows(index, train, sorted(shown))
    if changed:
        log.warning(
            "training rows %s changed since the index at %s was built: the report shows a "
            "note in place of their content, as their scores are of the indexed content. "
            "Rebuild the index (a new store.url) to attribute the data as it is now",
            changed[:10],
            index.store.url_of(""),
        )
    return changed


def _index_bytes(job: pipeline.Job) -> int:
    return sum(r.nbytes for r in job.index.committed().values())


def _summarised(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The one wrapper of every job: run `body`; a GrassError exits 2 with its message,
    Ctrl-C exits 130 saying what is kept, otherwise the summary (with total_seconds,
    counted from `job_start()`) is printed as JSON and returned."""
    t0 = job_start()
    try:
        summary = body()
    except GrassError as e:
        refuse(e)
    except KeyboardInterrupt as e:  # the job's stages stopped its workers on the way out
        exit_interrupted(e)
    summary["total_seconds"] = round(time.time() - t0, 3)
    answer(json.dumps(summary, indent=2, default=str))
    return summary


def _run(
    cfg: DictConfig,
    body: Callable[[pipeline.Job], dict[str, Any]],
    create_index: bool = True,
    query: bool = False,
) -> dict[str, Any]:
    def staged() -> dict[str, Any]:
        job = pipeline.prepare_started(
            cfg, create_index=create_index, query=query, started=job_start()
        )
        with pipeline.running(job):
            return job_summary(job, body(job))

    return _summarised(staged)


def _is_ensemble(raw: dict[str, Any]) -> bool:
    """Judged on the validated config, so a bad ensemble value exits 2 rather than raising.

    Every member's model arguments are checked here too: members run one after another, so
    a bad `ensemble.models[c]` would otherwise fail only after the members before it ran.
    """
    try:
        cfg = JobConfig.from_cfg(raw)
        if not ensemble.is_ensemble(cfg):
            return False
        for c, member in enumerate(ensemble.member_configs(raw, cfg)):
            try:
                check_arguments(locate_target(member["model"], "model"), member["model"], "model")
            except ConfigError as e:
                raise ConfigError(f"ensemble member {c} (model with its overrides): {e}") from None
        return True
    except GrassError as e:
        refuse(e)


def attribute(cfg: DictConfig) -> dict[str, Any]:
    """All stages: index, preconditioner, query gradients and scores, report.

    With ensemble.size > 1 (or ensemble.models) every member runs these stages and the
    scores are averaged (see grass_dist.scoring.ensemble).
    """
    try:
        raw = resolve(cfg)
    except GrassError as e:
        refuse(e)
    if _is_ensemble(raw):
        return _summarised(lambda: evaluate.attribute_ensemble(raw))

    def body(job: pipeline.Job) -> dict[str, Any]:
        out = pipeline.index_stages(job, precondition_next=True)
        query = pipeline.query_phi(job)
        out["precondition"] = pipeline.run_precondition(job)
        out.update(pipeline.score_stage(job, query))
        with job.stage("report"):
            out["report"] = make_report(job)
        out["index_bytes"] = _index_bytes(job)
        return out

    return _run(cfg, body, query=True)


def index(cfg: DictConfig) -> dict[str, Any]:
    """Only the gradient index (resumes: committed shards are skipped).

    With ``index.repair=true`` every committed shard is checked first and the bad ones are
    recomputed.
    """

    def body(job: pipeline.Job) -> dict[str, Any]:
        out = pipeline.index_stages(job)
        out["index_bytes"] = _index_bytes(job)
        return out

    return _run(cfg, body)


def gc(cfg: DictConfig) -> dict[str, Any]:
    """Remove shard attempt files no manifest version lists, and scoring runs that never
    completed, unchanged for gc.grace_s."""

    def body() -> dict[str, Any]:
        job = JobConfig.from_cfg(cfg)
        store = assembly.open_store(job)
        if not store.exists(INDEX_FILE):
            raise IndexNotFoundError(
                f"no gradient index at {store.url_of('')} ({INDEX_FILE} not found), so there is "
                "nothing to collect. Fix: point store.url (or index.url) at an existing index."
            )
        grace_s, dry_run = job.gc.grace_s, job.gc.dry_run

        def collected(where: Store) -> dict[str, Any]:
            report = collect(where, grace_s, dry_run).to_dict()
            report["results"] = results.collect_abandoned(where, grace_s, dry_run)
            return report

        report = collected(store)
        # An ensemble's members are whole indexes of their own, under ckpt_<c>/.
        members = {
            name: collected(assembly.open_store(job, store.url_of(name)))
            for name in store.list("")
            if re.fullmatch(ensemble.MEMBER_DIR.format(r"\d+"), name)
            and store.exists(f"{name}/{INDEX_FILE}")
        }
        if members:
            report["members"] = members
        return {"gc": report}

    return _summarised(body)


def score(cfg: DictConfig) -> dict[str, Any]:
    """Preconditioner and scores on an existing index whose fingerprint matches the config."""

    def body(job: pipeline.Job) -> dict[str, Any]:
        query = pipeline.query_phi(job)
        out = {"precondition": pipeline.run_precondition(job)}
        out.update(pipeline.score_stage(job, query))
        with job.stage("report"):
            out["report"] = make_report(job)
        return out

    return _run(cfg, body, create_index=False, query=True)


def lds(cfg: DictConfig) -> dict[str, Any]:
    """LDS of the result sets lds.results (default [run.name]): grass_dist.fidelity.evaluate.lds."""
    return _summarised(lambda: evaluate.lds(cfg))


def serve(cfg: DictConfig) -> None:
    """Check the config against the index, deploy the service and serve until stopped."""
    from grass_dist.service.app import serve_forever  # Ray Serve only for this door

    try:
        serve_forever(resolve(cfg))
    except GrassError as e:
        refuse(e)
