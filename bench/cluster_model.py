"""Commit-latency measurement and the scaling model of bench_cluster.py.

The model combines numbers measured on this machine (per-shard scheduling, commit latency
versus manifest size and versions, local write bandwidth) with stated assumptions about a
1B-parameter model on GPUs and an S3-class object store.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from grass_dist.index import GradientIndex, ShardRecord
from grass_dist.index.manifest import manifest_path

# ---- assumptions (not measured here) --------------------------------------------------
PARAMS = 1.24e9  # a Llama-style 1B model: 16 blocks, hidden 2048, MLP 8192
TOKENS_PER_ROW = 512
LAYERS = 16 * 7  # captured Linear layers: q, k, v, o, gate, up, down per block
K_PER_LAYER = 256  # compression.k (the default)
BYTES_PER_VALUE = 2  # index.dtype=bfloat16
GPU_FLOPS = 300e12  # sustained bf16 FLOP/s of one H100-class GPU on this workload
S3_STREAM_MBPS = 100.0  # one client's PUT stream to an S3-class store
S3_REQUEST_S = 0.02  # one S3 request's round trip (LIST, GET or conditional PUT)
DATASET_ROWS = 100e6  # rows to index (51 G tokens)
SHARD_ROWS = 4096
GPUS = (8, 64, 512)


def _record(i: int) -> ShardRecord:
    lo = i * SHARD_ROWS
    return ShardRecord(
        shard_id=f"{lo:012d}-{lo + SHARD_ROWS:012d}",
        start=lo,
        end=lo + SHARD_ROWS,
        rows=SHARD_ROWS,
        file=f"shards/{lo:012d}-{lo + SHARD_ROWS:012d}/{i:032x}.parquet",
        sha256=f"{i:064x}",
        nbytes=SHARD_ROWS * LAYERS * K_PER_LAYER * BYTES_PER_VALUE,
        attempt=f"{i:032x}",
    )


def _time_commits(index: GradientIndex, first: int, count: int = 7) -> float:
    """Median seconds of `count` single-shard commits (shard numbers from `first`)."""
    times = []
    for i in range(first, first + count):
        t0 = time.perf_counter()
        index.commit([_record(i)])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_commits(
    root: Path, quick: bool = False, tiny: bool = False
) -> dict[str, list[tuple[int, float]]]:
    """Commit latency on local disk versus shards listed and versions present."""
    fingerprint = {"layers": [{"name": "l0", "k": K_PER_LAYER}], "dtype": "bfloat16"}
    by_shards, by_versions = [], []
    sizes = (10, 100) if tiny else (100, 1000, 5000) if quick else (100, 1000, 10000)
    for n in sizes:
        index = GradientIndex.create_or_open(str(root / f"n{n}"), fingerprint)
        index.commit([_record(i) for i in range(n)])
        by_shards.append((n, _time_commits(index, n)))
    for v in (10, 100) if tiny else (10, 1000, 5000) if quick else (10, 1000, 10000):
        index = GradientIndex.create_or_open(str(root / f"v{v}"), fingerprint)
        doc = {"version": 1, "shards": {_record(0).shard_id: asdict(_record(0))}}
        data = json.dumps(doc).encode()
        for version in range(1, v + 1):  # older versions only need to exist
            index.store.write_bytes(manifest_path(version), data)
        by_versions.append((v, _time_commits(index, 1)))
    return {"shards": by_shards, "versions": by_versions}


def commit_table(commits: dict) -> list[str]:
    lines = [
        "## Manifest commit latency on local disk (median of 7 single-shard commits)",
        "",
        "| shards in manifest | ms | | manifest versions present | ms |",
        "|---:|---:|---|---:|---:|",
    ]
    for (n, t_n), (v, t_v) in zip(commits["shards"], commits["versions"], strict=True):
        lines.append(f"| {n} | {1e3 * t_n:.1f} | | {v} | {1e3 * t_v:.1f} |")
    return lines


def _slope(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of seconds against count."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - b * mx, b


def _commit_s3(shards: float, versions: float, per_shard_cpu: float) -> float:
    """Modelled seconds of one commit on S3 with `shards` listed and `versions` present."""
    manifest_mb = shards * len(json.dumps(asdict(_record(0)))) / 1e6
    requests = 2 + math.ceil(versions / 1000)  # LIST pages, GET newest, conditional PUT
    return requests * S3_REQUEST_S + 2 * manifest_mb / S3_STREAM_MBPS + shards * per_shard_cpu


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _commit_at_end(size: int, per_shard_cpu: float) -> float:
    """Modelled S3 commit once every shard of `size` rows is listed, one version per shard
    (the worst case: shards finish slower than commits, so each commit carries one)."""
    shards = DATASET_ROWS / size
    return _commit_s3(shards, shards, per_shard_cpu)


def model_section(overhead: list[dict], commits: dict) -> list[str]:
    """Where the bottleneck sits at 8, 64 and 512 GPUs for a 1B model (markdown lines)."""
    per_row = 4 * PARAMS * TOKENS_PER_ROW  # forward + input-gradient backward, no weight grads
    gpu_rows = GPU_FLOPS / per_row
    row_bytes = LAYERS * K_PER_LAYER * BYTES_PER_VALUE
    sched = statistics.median(m["sched"] for m in overhead)
    big = max(overhead, key=lambda m: m["rows"])
    disk_mbps = big["bytes"] / big["write"] / 1e6
    _, per_shard_cpu = _slope(commits["shards"])
    lines = [
        "## Scaling model: a 1B-parameter model on 8, 64 and 512 GPUs",
        "",
        f"Measured here: per-shard scheduling round trip {1e3 * sched:.1f} ms (median over "
        "shard sizes), one writer's Parquet encode + sha256 + local-disk write at "
        f"{disk_mbps:.0f} MB/s, commit cost {1e6 * per_shard_cpu:.1f} us per shard listed in "
        "the manifest (slope of the table above; the manifest is cumulative, so each commit "
        "rewrites it).",
        "",
        f"Assumed: {PARAMS / 1e9:.2f}B parameters, {TOKENS_PER_ROW} tokens per row, phi costs a "
        f"forward plus an input-gradient backward = 4 x params x tokens = {per_row:.2e} FLOP "
        f"per row; {GPU_FLOPS / 1e12:.0f} TFLOP/s sustained per GPU, so {gpu_rows:.0f} rows/s "
        f"per GPU; {LAYERS} captured layers x k={K_PER_LAYER} in bfloat16 = "
        f"{row_bytes / 1e3:.1f} kB of phi per row; an S3-class store at {S3_STREAM_MBPS:.0f} "
        f"MB/s per writer stream and {1e3 * S3_REQUEST_S:.0f} ms per request (a commit is a "
        "LIST per 1000 versions, a GET and a conditional PUT); "
        f"{DATASET_ROWS / 1e6:.0f} M rows.",
        "",
        f"With shards of {SHARD_ROWS} rows:",
        "",
        "| GPUs | rows/s | phi to store | per writer | shards/s | job | "
        "driver time on scheduling (upper bound) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in GPUS:
        rows = g * gpu_rows
        lines.append(
            f"| {g} | {rows:,.0f} | {rows * row_bytes / 1e6:,.0f} MB/s | "
            f"{gpu_rows * row_bytes / 1e6:.1f} MB/s | {rows / SHARD_ROWS:.2f} | "
            f"{DATASET_ROWS / rows / 3600:.1f} h | {100 * sched * rows / SHARD_ROWS:.2f}% |"
        )
    ratio = {}
    lines += [
        "",
        "Shard size (the same at any GPU count: a commit's cost depends on how many shards the "
        "manifest lists; workers keep `max_inflight_per_worker` = 2 shards queued, so a commit "
        "stalls them only when it outlasts a shard's compute):",
        "",
        "| rows/shard | shard compute | shard write (1 stream) | (sched + write)/compute | "
        "manifest at end | commit at end (S3) | commit / shard compute |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in (64, 512, 4096):
        compute = size / gpu_rows
        write = size * row_bytes / 1e6 / S3_STREAM_MBPS
        c_end = _commit_at_end(size, per_shard_cpu)
        ratio[size] = c_end / compute
        manifest_mb = DATASET_ROWS / size * len(json.dumps(asdict(_record(0)))) / 1e6
        lines.append(
            f"| {size} | {_fmt_s(compute)} | {_fmt_s(write)} | {(sched + write) / compute:.3f} "
            f"| {manifest_mb:,.0f} MB | {_fmt_s(c_end)} | {ratio[size]:.2f} |"
        )
    return [*lines, "", *_narrative(gpu_rows, row_bytes, disk_mbps, ratio)]


def _narrative(gpu_rows: float, row_bytes: int, disk_mbps: float, ratio: dict) -> list[str]:
    per_gpu = gpu_rows * row_bytes / 1e6
    mbps = {g: g * per_gpu for g in GPUS}
    ok = [s for s, r in ratio.items() if r < 1]
    stall = [s for s, r in ratio.items() if r >= 1]
    small = (
        f"shards of {', '.join(map(str, stall))} rows make commits outlast a shard's compute "
        "by the end of the job and stall workers"
        if stall
        else "no shard size tried makes commits outlast a shard"
    )
    return [
        "Where the bottleneck moves:",
        "",
        f"- **8 GPUs**: GPU compute. Each worker writes {per_gpu:.1f} MB/s of phi; one writer "
        f"here encoded, hashed and wrote {disk_mbps:.0f} MB/s, so writing keeps a worker's "
        f"writer thread {100 * per_gpu / disk_mbps:.0f}% busy, overlapped with compute. "
        f"{mbps[8]:.0f} MB/s in aggregate, a shard committed every "
        f"{SHARD_ROWS / (8 * gpu_rows):.1f} s: scheduling and commits are noise.",
        f"- **64 GPUs**: still GPU compute, if the index is on an object store: "
        f"{mbps[64]:.0f} MB/s in aggregate from 64 writers of {per_gpu:.1f} MB/s each is "
        f"within {64 * S3_STREAM_MBPS / 1e3:.1f} GB/s of assumed S3 streams; one NFS server or "
        "disk would have to sustain all of it (not measured here). Commits: "
        f"{64 * gpu_rows / SHARD_ROWS:.1f} shards/s.",
        f"- **512 GPUs**: store bandwidth ({mbps[512] / 1e3:.1f} GB/s in aggregate, spread over "
        "per-shard prefixes) and the single driver's commit path. The cumulative manifest "
        f"grows with every shard: {small}; "
        + (f"{max(ok)}-row shards keep commits well inside a shard. " if ok else "")
        + "Size shards so a shard's compute exceeds the end-of-job commit, or split the "
        "manifest into per-commit deltas (a format change, not done here).",
    ]
