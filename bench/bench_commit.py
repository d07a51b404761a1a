"""Manifest commit latency versus index size: cumulative manifests (before) and deltas (now).

    python bench/bench_commit.py              # a few minutes on 2 cores
    python bench/bench_commit.py --sizes 10 100 --commits 20 --checkpoint-every 10

For each index size (shards committed), on local disk, with synthetic shard records:

- before: the cumulative commit grass_dist made until delta manifests (list `_manifests/`,
  read the newest manifest, write all of it again plus one shard), reproduced here as it was
  (`cumulative_commit`) on an index holding one cumulative manifest of that size;
- now: `ManifestLog.commit` of one shard into an index built by commits of 100 shards each,
  timed over `--commits` commits (by default one checkpoint interval, so the mean includes
  exactly one checkpoint), and how long a new reader takes to open the index.

Results: printed and written to bench/results/commit.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grass_dist.index import ManifestLog, ShardRecord, Store  # noqa: E402
from grass_dist.index.manifest import CHECKPOINT_EVERY, manifest_path  # noqa: E402

SHARD_ROWS = 4096
SETUP_BATCH = 100  # shards per commit while building the index


def record(i: int) -> ShardRecord:
    """Synthetic shard ``i``: ids, paths and hashes shaped like real ones."""
    lo = i * SHARD_ROWS
    sid = f"{lo:012d}-{lo + SHARD_ROWS:012d}"
    return ShardRecord(
        sid, lo, lo + SHARD_ROWS, SHARD_ROWS, f"shards/{sid}/{i:032x}.parquet", f"{i:064x}",
        58_720_256, f"{i:032x}",
    )  # fmt: skip


def cumulative_commit(store: Store, rec: ShardRecord) -> int:
    """One commit as grass_dist made it before delta manifests (no race, no repair)."""
    newest = max(int(name[:10]) for name in store.list("_manifests") if name.endswith(".json"))
    doc = json.loads(store.read_bytes(manifest_path(newest)))
    shards = {sid: ShardRecord.from_dict(r) for sid, r in doc["shards"].items()}
    shards[rec.shard_id] = rec
    new = {
        "version": newest + 1,
        "shards": {sid: r.to_dict() for sid, r in sorted(shards.items())},
        "created": datetime.now(timezone.utc).isoformat(),
    }
    assert store.create_only(
        manifest_path(newest + 1), json.dumps(new, indent=1, sort_keys=True).encode()
    )
    return newest + 1


def before(root: Path, n: int, commits: int) -> list[float]:
    """Seconds of `commits` cumulative commits on an index of `n` shards."""
    store = Store(str(root / f"before-{n}"))
    doc = {"version": 1, "shards": {r.shard_id: r.to_dict() for r in map(record, range(n))}}
    store.write_bytes(manifest_path(1), json.dumps(doc, indent=1, sort_keys=True).encode())
    times = []
    for i in range(n, n + commits):
        t0 = time.perf_counter()
        cumulative_commit(store, record(i))
        times.append(time.perf_counter() - t0)
    return times


def after(root: Path, n: int, commits: int, checkpoint_every: int) -> dict[str, float]:
    """Delta commits of one shard on an index of `n` shards, and a new reader's open."""
    url = str(root / f"after-{n}")
    log = ManifestLog(Store(url), checkpoint_every)
    for lo in range(0, n, SETUP_BATCH):
        log.commit([record(i) for i in range(lo, min(lo + SETUP_BATCH, n))])
    times, checkpoint, checkpoints = [], 0.0, 0
    for i in range(n, n + commits):
        t0 = time.perf_counter()
        version = log.commit([record(i)])
        times.append(time.perf_counter() - t0)
        if version % checkpoint_every == 0:
            checkpoint, checkpoints = times[-1], checkpoints + 1
    t0 = time.perf_counter()
    _, shards = ManifestLog(Store(url), checkpoint_every).snapshot()
    opened = time.perf_counter() - t0
    assert len(shards) == n + commits
    delta = os.path.getsize(os.path.join(url, manifest_path(version)))
    return {
        "median": statistics.median(times),
        "mean": statistics.fmean(times),
        "max": max(times),
        "checkpoint": checkpoint,
        "checkpoints": checkpoints,
        "open": opened,
        "delta_bytes": delta,
    }


def markdown(rows: list[dict], args: argparse.Namespace, load: float) -> str:
    lines = [
        "# Manifest commit latency versus index size",
        "",
        f"`python bench/bench_commit.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"Machine: {os.cpu_count()} CPUs, load average at start {load:.1f} (other jobs share "
        "it); local-disk index (fsync per manifest write); synthetic shard records.",
        "",
        f"Before: cumulative manifests, median of {args.before_commits} single-shard commits "
        "(each lists `_manifests/`, reads the newest manifest and writes all of it again). "
        f"Now: delta manifests, {args.commits} single-shard commits by one `ManifestLog` "
        f"(a checkpoint every {args.checkpoint_every} versions, written by the commit of that "
        f"version: the mean includes {rows[-1]['checkpoints']}, timed on its own in "
        "'checkpoint commit'); open: a new reader's first `snapshot()` (newest checkpoint + "
        "the deltas after it).",
        "",
        "| shards in index | before: median ms | now: median ms | now: mean ms | now: max ms "
        "| checkpoint commit ms | delta bytes | open ms | before / now (median) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {1e3 * r['before']:.1f} | {1e3 * r['median']:.2f} | "
            f"{1e3 * r['mean']:.2f} | {1e3 * r['max']:.1f} | {1e3 * r['checkpoint']:.0f} | "
            f"{r['delta_bytes']} | {1e3 * r['open']:.0f} | {r['before'] / r['median']:.0f}x |"
        )
    first, last = rows[0], rows[-1]
    lines += [
        "",
        f"Now, {last['n']} shards / {first['n']} shards: median commit "
        f"{last['median'] / first['median']:.2f}x, mean {last['mean'] / first['mean']:.2f}x "
        f"(before: {last['before'] / first['before']:.0f}x). A commit writes only its own "
        "records and never lists `_manifests/`; the checkpoint (the whole state) is the one "
        "cost that grows with the index, paid once per checkpoint interval.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 10_000, 100_000])
    parser.add_argument("--commits", type=int, default=CHECKPOINT_EVERY)
    parser.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY)
    parser.add_argument("--before-commits", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "commit.md"))
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-commit-") as tmp:
        for n in args.sizes:
            print(f"{n} shards", flush=True)
            row = {"n": n, "before": statistics.median(before(Path(tmp), n, args.before_commits))}
            row.update(after(Path(tmp), n, args.commits, args.checkpoint_every))
            rows.append(row)
            print(json.dumps(row), flush=True)
    text = markdown(rows, args, load)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
