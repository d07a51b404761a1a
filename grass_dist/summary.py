"""What a finished job reports, the same from every door (`jobs/`, the Python API): its
stages' results, then its start-up, compression, stage timings and index."""

from __future__ import annotations

from typing import Any

from grass_dist.job import Job


def stage_seconds(job: Job) -> dict[str, float]:
    """The job's stage timings as every door's summary shows them (`stage_seconds`)."""
    return {stage: round(seconds, 3) for stage, seconds in job.timings.items()}


def job_summary(job: Job, stages: dict[str, Any]) -> dict[str, Any]:
    """A finished job's summary, as every door reports it: what its stages returned
    (`stages`, by stage), then the time to its first committed shard, where its start-up
    went, its compression, the records it skipped, its stage timings and its index."""
    out = dict(stages)
    if job.first_shard_s is not None:  # the wait for the first result on disk
        out["first_shard_seconds"] = round(job.first_shard_s, 3)
    # Where the start-up went: its milestones, in order, in seconds from the job's start.
    milestones = sorted(job.startup_s.items(), key=lambda item: item[1])
    out["startup_seconds"] = {name: round(at, 3) for name, at in milestones}
    out["compression"] = compression_summary(job)
    if job.skipped_records:
        out["skipped_records"] = job.skipped_records  # data.train.on_bad_record=skip
    out["stage_seconds"] = stage_seconds(job)
    out["index_url"] = job.index.store.url_of("")
    return out


def compression_summary(job: Job) -> dict[str, Any]:
    """What a summary says of the compression: method, k per layer (none for identity,
    which keeps every layer's whole gradient), the numbers each row stores over all layers,
    the layers attributed and those kept whole."""
    c = job.cfg.compression
    return {
        "method": c.method,
        "k": None if c.method == "identity" else c.k,
        "row_dims": sum(k for _, k in job.index.layers),
        "layers": [name for name, _ in job.index.layers],
        "whole_small_layers": c.whole_small_layers,
        "whole_layers": job.whole_layers,
    }
