"""Time to the first committed shard, and to the whole job, of the documented example jobs.

    .venv/bin/python bench/bench_first_shard.py                  # 5 runs of each job
    .venv/bin/python bench/bench_first_shard.py --repeats 9
    .venv/bin/python bench/bench_first_shard.py --jobs tiny_gpt2
    .venv/bin/python bench/bench_first_shard.py --tiny           # seconds

What a user waits for after `python -m jobs.attribute`: the job summary's
`first_shard_seconds`, from the process start to the first shard committed to the index,
against its target (5 s for the default digits job, 10 s for the language-model example
`+example=tiny_gpt2`), and the whole job (`total_seconds`, and the process's wall time).
Each job first runs `--warmup` times uncounted (they train and cache its model under
`--workdir`: keep one to skip the language model's minutes of training next time), then the
jobs run in turn, `--repeats` times, each run into a fresh index. The summary's
`startup_seconds` say where a run's start-up went: the driver's checks done (`prepared`:
config, model, data, store), the embedded Ray up (`ray`), the first worker ready
(`first_worker`). Writes bench/results/first_shard.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.timing import job_summary, write_result  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "first_shard.md"


@dataclass
class Job:
    """One documented job: its overrides, its first-shard target, and its runs' summaries."""

    name: str
    overrides: list[str]
    target_s: float
    runs: list[dict] = field(default_factory=list)  # summary, with the process's "wall"

    def median_run(self) -> dict:
        """The run whose first shard is the median one (the lower middle of an even count)."""
        ranked = sorted(self.runs, key=lambda s: s["first_shard_seconds"])
        return ranked[(len(ranked) - 1) // 2]


def jobs(tiny: bool) -> list[Job]:
    """The default job and the language-model example; `tiny`: each on a few rows (and the
    language model trained for a few steps), for the test suite."""
    digits = ["data.train.n_train=200", "data.train.n_query=20"] if tiny else []
    lm = ["data.train.n_docs=24", "model.steps=2"] if tiny else []
    return [Job("digits", digits, 5.0), Job("tiny_gpt2", ["+example=tiny_gpt2", *lm], 10.0)]


def run_job(job: Job, workdir: Path) -> dict:
    """`python -m jobs.attribute` with the job's overrides into a fresh index under
    `workdir` (its models cached there across runs): the summary, with the wall time."""
    store = workdir / f"index-{job.name}"
    shutil.rmtree(store, ignore_errors=True)
    command = [
        sys.executable, "-m", "jobs.attribute", *job.overrides,
        f"store.url={store}", f"run.output_dir={workdir / 'outputs'}",
    ]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return {**job_summary(done.stdout), "wall": wall}


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def table(runs: list[Job]) -> list[str]:
    """Each job's runs: first shard against its target, total_seconds, wall time."""
    rows = []
    for job in runs:
        first = [s["first_shard_seconds"] for s in job.runs]
        met = sum(f <= job.target_s for f in first)
        rows.append([
            job.name, _seconds(first), f"{statistics.median(first):.1f}", f"{min(first):.1f}",
            f"{job.target_s:.0f}", f"{met} of {len(first)}",
            _seconds([s["total_seconds"] for s in job.runs]),
            f"{statistics.median(s['wall'] for s in job.runs):.1f}",
        ])  # fmt: skip
    header = ["job", "first shard s (runs)", "median", "best", "target", "met"]
    return _markdown([*header, "total_seconds (runs)", "wall s (median)"], rows)


def timeline(runs: list[Job]) -> list[str]:
    """Each job's median run: its start-up milestones and first stages, in seconds."""
    rows = []
    for job in runs:
        s = job.median_run()
        up, stages = s.get("startup_seconds", {}), s["stage_seconds"]
        rows.append([
            job.name,
            *(f"{up[k]:.2f}" if k in up else "-" for k in ("prepared", "ray", "first_worker")),
            f"{s['first_shard_seconds']:.2f}",
            *(f"{stages[k]:.2f}" if k in stages else "-" for k in ("start_workers", "index")),
            str(s["index"].get("driver_shards", "-")),
        ])  # fmt: skip
    header = ["job (median run)", "prepared", "ray", "first_worker", "first shard"]
    return _markdown([*header, "start_workers", "index", "driver_shards"], rows)


def versions() -> str:
    import ray
    import torch
    import transformers

    return ", ".join(f"{m.__name__} {m.__version__}" for m in (torch, transformers, ray))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=None, help="default 1, 0 with --tiny")
    p.add_argument("--tiny", action="store_true", help="a few rows per job: the test suite's")
    p.add_argument("--jobs", nargs="+", default=["digits", "tiny_gpt2"], help="default: both")
    p.add_argument("--workdir", default=None, help="default: a temporary folder")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    warmup = args.warmup if args.warmup is not None else 0 if args.tiny else 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_first_shard_"))
    todo = [job for job in jobs(args.tiny) if job.name in args.jobs]
    if len(todo) != len(set(args.jobs)):
        raise SystemExit(f"--jobs: known jobs are {[job.name for job in jobs(False)]}")
    load = os.getloadavg()[0]
    for job in todo:
        for _ in range(warmup):
            run_job(job, work)
    for r in range(args.repeats):
        for job in todo:
            job.runs.append(run_job(job, work))
            print(
                f"{job.name} run {r + 1}: first shard {job.runs[-1]['first_shard_seconds']:.2f} "
                f"s, total {job.runs[-1]['total_seconds']:.2f} s",
                flush=True,
            )
    command = "python bench/bench_first_shard.py " + " ".join(sys.argv[1:])
    lines = [
        "# Time to the first committed shard: the documented example jobs",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {os.cpu_count()} cores; load average {load:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end (a shared machine: the jobs run in turn). "
        f"Versions: {versions()}.",
        "",
        "Jobs: "
        + " and ".join(f"`{' '.join(['python -m jobs.attribute', *j.overrides])}`" for j in todo)
        + f" ({', '.join(j.name for j in todo)}), each with a fresh index and its model "
        f"cached by {warmup} uncounted run(s); "
        "`first_shard_seconds` and `total_seconds` from the job summary (both from the "
        "process start), wall time of the whole process.",
        "",
        *table(todo),
        "",
        "Where the median run's start-up went (seconds from the process start; "
        "`startup_seconds` of its summary: `prepared` = the driver checked config, model, data "
        "and store and holds its replica, `ray` = the embedded Ray is up, `first_worker` = "
        "the first worker is ready, absent when no stage waited for one; then the stages that "
        "ran meanwhile):",
        "",
        *timeline(todo),
    ]
    write_result(args.out, lines)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
