"""All-pairs scoring throughput against torch.matmul, and query-service latency.

    python bench/bench_scoring.py [--rows 100000 --queries 5000 --topk 10 1024 --dims 128 512]

Scoring (one process, one torch thread, random float32 data in memory). Each variant is
timed by the process's CPU time, which a busy shared machine inflates far less than wall
time (with one thread the two agree on an idle machine); wall times are listed too. Best
of `--repeats` interleaved runs:

- matmul: `torch.matmul(queries (Q, K), tile.T)` for every tile of train rows, output
  discarded: the GEMM alone, the baseline;
- scorer: grass_dist's TileScorer on the same tiles (GEMM + exact running top-k
  proponents and opponents + squared norms), finished into sorted (Q, k) lists; at small
  K it runs the GEMM a cache-sized block of queries at a time and filters each block while
  in cache, which also makes its GEMM faster than the baseline's whole-tile one;
- index: the same scoring streamed from a float16 gradient index on local disk
  (read + decode + score) via runtime.scoring.score_records.

Service: a synthetic `--service-rows`-row index carrying the default digits job's
fingerprint (so the service accepts it), served on 127.0.0.1 by `grass_dist.service`;
latency of single-example queries through grass_dist.Client, with the train phi cached in
the replica and streamed from the shards (serve.cache_bytes=0).

Writes bench/results/scoring.md (or `--out`).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from grass_dist.index import GradientIndex  # noqa: E402
from grass_dist.runtime.scoring import ScoreOptions, score_records  # noqa: E402
from grass_dist.scoring.score import QuerySide, TileScorer  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "scoring.md")


def layers_of(dim: int) -> list[tuple[str, int, int]]:
    return [("a", 0, dim // 2), ("b", dim // 2, dim)]


class Clock:
    """CPU and wall seconds of a block."""

    def __enter__(self) -> Clock:
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu = time.process_time() - self.cpu
        self.wall = time.perf_counter() - self.wall


def time_matmul(q: torch.Tensor, train: torch.Tensor, tile: int) -> Clock:
    # The scorer caps its (Q, tile) buffer at 2**24 floats: use the same tiles here.
    tile = min(tile, max(256, (1 << 24) // q.shape[0]))
    out = torch.empty(q.shape[0] * tile)
    with Clock() as clock:
        for lo in range(0, train.shape[0], tile):
            t = train[lo : lo + tile]
            torch.matmul(q, t.T, out=out[: q.shape[0] * t.shape[0]].view(q.shape[0], -1))
    return clock


def time_scorer(q: torch.Tensor, train: torch.Tensor, tile: int, k: int) -> Clock:
    query = QuerySide(q, layers_of(q.shape[1]), "grad_dot")
    rows = np.arange(train.shape[0], dtype=np.int64)
    with Clock() as clock:
        scorer = TileScorer(query, k, tile, expected_rows=train.shape[0])
        scorer.add(rows, train)
        scorer.finish()
    return clock


def write_index(url: str, train: torch.Tensor, shard: int, fingerprint: dict) -> GradientIndex:
    index = GradientIndex.create_or_open(url, fingerprint)
    names = [d["name"] for d in fingerprint["layers"]]
    bounds = np.cumsum([0] + [d["k"] for d in fingerprint["layers"]])
    records = []
    for lo in range(0, train.shape[0], shard):
        x = train[lo : lo + shard].numpy()
        rows = np.arange(lo, lo + len(x))
        phi = {n: x[:, bounds[i] : bounds[i + 1]] for i, n in enumerate(names)}
        keys = [f"synthetic/{r}" for r in rows]
        records.append(index.write_shard(f"{lo:09d}", lo, lo + len(x), rows, keys, phi))
    index.commit(records)
    return index


def time_index(q: torch.Tensor, train: torch.Tensor, tile: int, k: int, shard: int) -> Clock:
    half = q.shape[1] // 2
    fp = {"layers": [{"name": "a", "k": half}, {"name": "b", "k": q.shape[1] - half}]}
    with tempfile.TemporaryDirectory() as tmp:
        index = write_index(tmp, train, shard, {**fp, "dtype": "float16"})
        records = sorted(index.committed().values(), key=lambda r: r.start)
        query = QuerySide(q, layers_of(q.shape[1]), "grad_dot")
        with Clock() as clock:
            score_records(index, records, query, ScoreOptions(k, tile))
        return clock


def bench_scoring(args) -> list[str]:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    lines = [
        f"rows={args.rows} queries={args.queries} tile_rows={args.tile_rows} "
        f"shard_rows={args.shard_rows}; best of {args.repeats}, 1 torch thread. Pairs/s by "
        "CPU time (wall-time ratio in brackets).",
        "",
        "`top-k ns/pair`: the scorer's CPU time beyond the GEMM, per (query, train row) pair: the",
        "exact top-k's passes over each score tile plus its merges, which grow with top-k and",
        "do not shrink with K, so at small K (a cheap GEMM) they weigh more.",
        "",
        "| K | top-k | matmul pairs/s | scorer pairs/s | scorer/matmul | top-k ns/pair "
        "| index pairs/s | index/matmul |",
        "|---|---|---|---|---|---|---|---|",
    ]
    variants = {"matmul": lambda q, t: time_matmul(q, t, args.tile_rows)}
    for k in args.topk:
        variants[f"scorer {k}"] = lambda q, t, k=k: time_scorer(q, t, args.tile_rows, k)
        variants[f"index {k}"] = lambda q, t, k=k: time_index(
            q, t, args.tile_rows, k, args.shard_rows
        )
    pairs = args.rows * args.queries
    for dim in args.dims:
        q = torch.randn(args.queries, dim, generator=gen)
        train = torch.randn(args.rows, dim, generator=gen)
        cpu = dict.fromkeys(variants, np.inf)
        wall = dict.fromkeys(variants, np.inf)
        for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
            for name, run in variants.items():
                clock = run(q, train)
                cpu[name], wall[name] = min(cpu[name], clock.cpu), min(wall[name], clock.wall)
        for k in args.topk:
            scorer, index = f"scorer {k}", f"index {k}"
            lines.append(
                f"| {dim} | {k} | {pairs / cpu['matmul']:.3g} | {pairs / cpu[scorer]:.3g} | "
                f"{cpu['matmul'] / cpu[scorer]:.2f} ({wall['matmul'] / wall[scorer]:.2f}) | "
                f"{(cpu[scorer] - cpu['matmul']) / pairs * 1e9:.2f} | "
                f"{pairs / cpu[index]:.3g} | "
                f"{cpu['matmul'] / cpu[index]:.2f} ({wall['matmul'] / wall[index]:.2f}) |"
            )
            print(lines[-1], flush=True)
    return lines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_service(args) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="grass-bench-serve-") as tmp:
        return _bench_service(args, tmp)


def _bench_service(args, tmp: str) -> list[str]:
    import ray
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from grass_dist import Client
    from grass_dist.build import (
        build_dataset,
        build_layer_compressors,
        build_model,
        build_task,
        fingerprint,
    )
    from grass_dist.config import JobConfig, register_configs
    from grass_dist.runtime.reducer import preconditioner_path
    from grass_dist.scoring.fisher_sum import FisherSum
    from grass_dist.scoring.precondition import Preconditioner
    from grass_dist.service import app

    port = free_port()
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose("config", [f"run.output_dir={tmp}", f"serve.port={port}"])
    raw = OmegaConf.to_container(cfg, resolve=True)
    job = JobConfig.from_cfg(raw)
    model = build_model(job)
    comps = build_layer_compressors(job, model)
    fp = fingerprint(job, model, comps, build_task(job), build_dataset(job, "train"))
    dim = sum(c.out_dim for c in comps.values())
    train = torch.randn(args.service_rows, dim, generator=torch.Generator().manual_seed(1))
    index = write_index(job.index_url, train, args.shard_rows, fp)
    fisher = FisherSum({}, 0)
    for _, data in index.iter_committed():
        fisher = fisher + FisherSum.of(data.phi)
    pre = Preconditioner.from_fisher(fisher)
    index.put_artifact(preconditioner_path(job.precondition.name), pre.to_bytes())
    query = build_dataset(job, "query")
    examples = [{"input": query[i][0], "label": int(query[i][1])} for i in range(len(query))]
    lines = [
        "",
        f"## Service latency: one example per request, {args.service_rows} train rows, "
        f"K={dim} ({len(comps)} layers), topk=10, influence",
        "",
        "| train phi | requests | p50 ms | p95 ms | mean ms |",
        "|---|---|---|---|---|",
    ]
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    try:
        for label, n, extra in (
            ("cached in replica", args.requests, {}),
            ("streamed from shards", max(10, args.requests // 10), {"cache_bytes": 0}),
        ):
            url = app.start({**raw, "serve": {**raw["serve"], **extra}})
            client = Client(url)
            for e in examples[:5]:  # warm-up
                client.query([e])
            lat = []
            for i in range(n):
                t0 = time.perf_counter()
                client.query([examples[i % len(examples)]])
                lat.append(1000 * (time.perf_counter() - t0))
            p50, p95 = np.percentile(lat, [50, 95])
            lines.append(f"| {label} | {n} | {p50:.1f} | {p95:.1f} | {np.mean(lat):.1f} |")
            print(lines[-1], flush=True)
            app.stop()
    finally:
        ray.shutdown()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=5_000)
    ap.add_argument("--topk", type=int, nargs="+", default=[10, 1024])
    ap.add_argument("--tile-rows", type=int, default=4096)
    ap.add_argument("--shard-rows", type=int, default=20_000)
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 512, 1024])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--service-rows", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--skip-service", action="store_true")
    ap.add_argument("--skip-scoring", action="store_true")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    lines = [] if args.skip_scoring else bench_scoring(args)
    if not args.skip_service:
        lines += bench_service(args)
    header = (
        "# All-pairs scoring throughput and service latency\n\n"
        f"`{' '.join(['python bench/bench_scoring.py', *sys.argv[1:]])}`"
        f" on {os.cpu_count()} CPUs (load average {load:.1f} at start), torch "
        f"{torch.__version__}\n\n## Scoring throughput\n\n"
    )
    text = header + "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
