"""Index throughput on Ray, per-shard overhead, commit cost, and a scaling model.

    python bench/bench_cluster.py            # about 3-5 minutes on 2 cores
    python bench/bench_cluster.py --quick    # smaller datasets, fewer repeats
    python bench/bench_cluster.py --tiny     # a few shards of each: the test suite's run

1. Throughput: the digits MLP (64-128-64-10, FactGraSS k=256 per layer) indexed by 1 and by
   2 workers (1 CPU, 1 torch thread each) on an embedded Ray, workers started before the
   clock starts; rows/s over the whole index stage (scheduling, writes, commits included).
2. Per-shard overhead for shards of 64, 512 and 4096 rows, one worker, one shard at a time:
   scheduling (driver round trip minus the worker's own phases), Parquet write and manifest
   commit, as a fraction of the shard's compute (forward, backward, compression).
3. Overlap: with 2 shards in flight, how much of the workers' write and load time ran while
   another shard computed (from the workers' phase timelines).
4. Commit latency versus manifest size (shards listed) and manifest versions on local disk.
5. A scaling model for a 1B-parameter model at 8, 64 and 512 GPUs from the measured numbers
   and stated assumptions.

Results: printed and written to bench/results/cluster.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from bench.cluster_model import commit_table, measure_commits, model_section  # noqa: E402
from grass_dist import pipeline  # noqa: E402
from grass_dist.config import register_configs  # noqa: E402
from grass_dist.data.digits import DigitsDataset, digits  # noqa: E402
from grass_dist.runtime import job_actors  # noqa: E402
from grass_dist.runtime.overlap import overlap_seconds  # noqa: E402
from grass_dist.runtime.pool import ActorPool  # noqa: E402
from grass_dist.runtime.worker import ShardPlan, shard_id  # noqa: E402


class TiledDigits:
    """The digits training split repeated to `rows` items (row i is image i mod n_train)."""

    def __init__(self, base: DigitsDataset, rows: int):
        self.base, self.rows = base, rows
        self.keys = [f"{base.keys[i % len(base)]}#{i}" for i in range(rows)]

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int):
        return self.base[int(i) % len(self.base)]


def tiled_digits(rows: int, split: str, n_train: int, n_query: int, seed: int) -> TiledDigits:
    """Hydra target: `rows` training items tiled from the digits training split."""
    return TiledDigits(digits(split, n_train, n_query, seed), rows)


def job_cfg(out: Path, name: str, rows: int, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                f"run.output_dir={out}",
                f"store.url={out / name}",
                "data.train._target_=bench.bench_cluster.tiled_digits",
                f"+data.train.rows={rows}",
                "cluster.cpus_per_worker=1",
                *overrides,
            ],
        )


def started(job: pipeline.Job, workers: int) -> ActorPool:
    """The job's worker pool with all `workers` ready (startup is not benchmarked)."""
    pool = job_actors.ready_pool(job)
    pool.wait_ready(workers)
    return pool


def throughput(out: Path, rows: int, repeats: int) -> list[dict]:
    """Index `rows` rows with 1 and with 2 workers, alternating so both see the same load."""
    found = []
    for rep in range(repeats):
        for workers in (1, 2):
            job = pipeline.prepare(
                job_cfg(out, f"tp-{workers}-{rep}", rows, f"cluster.num_workers={workers}")
            )
            try:
                started(job, workers)
                stats = pipeline.run_index(job)
            finally:
                pipeline.shutdown(job)
            seconds = job.timings["index"]
            found.append({"workers": workers, "rows": stats["rows"], "seconds": seconds})
            print(f"  {workers} worker(s), run {rep}: {stats['rows'] / seconds:8.0f} rows/s")
    return found


def shard_overhead(out: Path, size: int, shards: int) -> dict:
    """Run `shards` shards of `size` rows one at a time on one worker; median phase times."""
    job = pipeline.prepare(job_cfg(out, f"ov-{size}", size * shards, "cluster.num_workers=1"))
    try:
        actor = started(job, 1).actors[0]
        per = []
        for lo in range(0, size * shards, size):
            plan = ShardPlan(shard_id(lo, lo + size), lo, lo + size)
            t0 = time.perf_counter()
            res = ray.get(actor.index_shard.remote(plan))
            t1 = time.perf_counter()
            job.index.commit([res.record])
            t2 = time.perf_counter()
            worker = sum(res.seconds.values())
            per.append(
                {
                    **res.seconds,
                    "sched": t1 - t0 - worker,
                    "commit": t2 - t1,
                    "bytes": res.record.nbytes,
                }
            )
    finally:
        pipeline.shutdown(job)
    med = {k: statistics.median(p[k] for p in per[1:]) for k in per[0]}  # first one warms up
    med["rows"] = size
    med["fraction"] = (med["sched"] + med["write"] + med["commit"]) / med["compute"]
    return med


def overlap(out: Path, rows: int) -> dict:
    """Index with 2 shards in flight per worker; share of write/load time under a compute."""
    job = pipeline.prepare(
        job_cfg(out, "overlap", rows, "cluster.num_workers=1", "index.shard_size=512")
    )
    try:
        pool = started(job, 1)
        pipeline.run_index(job)
        spans = ray.get(pool.actors[0].timeline.remote())
    finally:
        pipeline.shutdown(job)
    total = {p: sum(s.end - s.start for s in spans if s.phase == p) for p in ("load", "write")}
    return {
        p: overlap_seconds(spans, p, "compute") / total[p] if total[p] else 0.0
        for p in ("load", "write")
    }


def _mode(args) -> str:
    return " --tiny" if args.tiny else " --quick" if args.quick else ""


def write_markdown(path: Path, args, tp, ov, lap, commits, load) -> str:
    lines = [
        "# Cluster benchmark: throughput, per-shard overhead, commit cost, scaling model",
        "",
        f"`python bench/bench_cluster.py{_mode(args)}`",
        "",
        f"Machine: {os.cpu_count()} CPUs, load average at start {load:.1f} (other jobs share "
        "it); embedded Ray with 4 logical CPUs; local-disk index.",
        "",
        "## Index throughput (digits MLP, FactGraSS k=256 x 3 layers, shards of 128 rows)",
        "",
        "| workers | rows | seconds | rows/s | vs 1 worker |",
        "|---:|---:|---:|---:|---:|",
    ]
    rates = {w: [r["rows"] / r["seconds"] for r in tp if r["workers"] == w] for w in (1, 2)}
    for r in sorted(tp, key=lambda r: r["workers"]):
        rate = r["rows"] / r["seconds"]
        lines.append(
            f"| {r['workers']} | {r['rows']} | {r['seconds']:.2f} | {rate:.0f} | "
            f"{rate / max(rates[1]):.2f} |"
        )
    lines += [
        "",
        f"2 workers / 1 worker: {max(rates[2]) / max(rates[1]):.2f}x best to best, "
        f"{statistics.median(rates[2]) / statistics.median(rates[1]):.2f}x median to median "
        "(runs alternate 1 and 2 workers; the 2 cores also run the driver, Ray and other "
        "jobs).",
        "",
    ]
    lines += [
        "## Per-shard overhead (1 worker, one shard at a time; medians, ms)",
        "",
        "| rows/shard | load | compute | write | scheduling | commit | shard MB | "
        "(sched+write+commit)/compute |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in ov:
        lines.append(
            f"| {m['rows']} | {1e3 * m['load']:.1f} | {1e3 * m['compute']:.1f} | "
            f"{1e3 * m['write']:.1f} | {1e3 * m['sched']:.1f} | {1e3 * m['commit']:.1f} | "
            f"{m['bytes'] / 1e6:.2f} | {m['fraction']:.2f} |"
        )
    lines += [
        "",
        "## Overlap with 2 shards in flight per worker (shards of 512 rows)",
        "",
        f"{100 * lap['write']:.0f}% of write time and {100 * lap['load']:.0f}% of load time "
        "ran while another shard computed on the same worker.",
        "",
        *commit_table(commits),
        "",
        *model_section(ov, commits),
    ]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a few shards of each (tests)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cluster.md"))
    args = parser.parse_args()

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        out = Path(tmp)
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            configure_logging=False,
            logging_level="ERROR",
        )
        try:
            print("throughput")
            rows = 1024 if args.tiny else 4096 if args.quick else 32768
            tp = throughput(out, rows, 1 if args.quick or args.tiny else 3)
            print("per-shard overhead")
            sizes = ((64, 3), (512, 2)) if args.tiny else ((64, 12), (512, 6), (4096, 4))
            ov = [shard_overhead(out, s, n) for s, n in sizes]
            print("overlap")
            lap = overlap(out, 1024 if args.tiny else 4096)
        finally:
            ray.shutdown()
        print("commit latency")
        commits = measure_commits(out / "commits", quick=args.quick, tiny=args.tiny)
    text = write_markdown(Path(args.out), args, tp, ov, lap, commits, load)
    print(text)
    print(json.dumps({"written": args.out}))


if __name__ == "__main__":
    main()
