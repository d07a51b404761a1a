"""All-pairs scoring throughput against a plain torch.matmul of the same shapes.

    python bench/bench_scoring.py [--rows 200000 --queries 5000 --topk 1024 --dims 128 512]

For each total compressed size K (split over two layers) it times, in one process and one
torch thread, over the same random float32 data held in memory:

- matmul: `torch.matmul(queries (Q, K), tile.T)` for every tile of `tile_rows` train rows,
  the output discarded (the GEMM-only lower bound on time);
- scorer: grass_dist's TileScorer on the same tiles (GEMM + running top-k proponents and
  opponents + squared norms), finished into sorted (Q, k) lists;
- index: the same scoring streamed from a float16 gradient index on local disk
  (read + decode + score), via runtime.scoring.score_records.

Throughput is pairs (train rows x queries) per second; the ratio is scorer / matmul.
Writes bench/results/scoring.md; the service latency section is added by bench_service.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grass_dist.index import GradientIndex  # noqa: E402
from grass_dist.runtime.scoring import ScoreOptions, score_records  # noqa: E402
from grass_dist.score import QuerySide, TileScorer  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scoring.md")


def layers_of(dim: int) -> list[tuple[str, int, int]]:
    return [("a", 0, dim // 2), ("b", dim // 2, dim)]


def time_matmul(q: torch.Tensor, train: torch.Tensor, tile: int) -> float:
    out = torch.empty(q.shape[0] * tile)
    t0 = time.perf_counter()
    for lo in range(0, train.shape[0], tile):
        t = train[lo : lo + tile]
        torch.matmul(q, t.T, out=out[: q.shape[0] * t.shape[0]].view(q.shape[0], -1))
    return time.perf_counter() - t0


def time_scorer(q: torch.Tensor, train: torch.Tensor, tile: int, k: int) -> float:
    query = QuerySide(q, layers_of(q.shape[1]), "grad_dot")
    rows = np.arange(train.shape[0], dtype=np.int64)
    t0 = time.perf_counter()
    scorer = TileScorer(query, k, tile)
    scorer.add(rows, [], train)
    scorer.finish()
    return time.perf_counter() - t0


def time_index(q: torch.Tensor, train: torch.Tensor, tile: int, k: int, shard: int) -> float:
    half = q.shape[1] // 2
    with tempfile.TemporaryDirectory() as tmp:
        fp = {"layers": [{"name": "a", "k": half}, {"name": "b", "k": q.shape[1] - half}]}
        index = GradientIndex.create_or_open(tmp, {**fp, "dtype": "float16"})
        records = []
        for lo in range(0, train.shape[0], shard):
            x = train[lo : lo + shard].numpy()
            rows = np.arange(lo, lo + len(x))
            phi = {"a": x[:, :half], "b": x[:, half:]}
            records.append(
                index.write_shard(f"{lo:09d}", lo, lo + len(x), rows, [str(r) for r in rows], phi)
            )
        index.commit(records)
        query = QuerySide(q, layers_of(q.shape[1]), "grad_dot")
        t0 = time.perf_counter()
        score_records(index, records, query, ScoreOptions(k, tile, verify=True))
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=5_000)
    ap.add_argument("--topk", type=int, default=1024)
    ap.add_argument("--tile-rows", type=int, default=4096)
    ap.add_argument("--shard-rows", type=int, default=20_000)
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-index", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    lines = [
        f"rows={args.rows} queries={args.queries} topk={args.topk} tile_rows={args.tile_rows}"
        f" threads=1 cpus={os.cpu_count()} torch={torch.__version__}",
        "",
        "| K | matmul pairs/s | scorer pairs/s | scorer / matmul | index pairs/s | index / matmul |",
        "|---|---|---|---|---|---|",
    ]
    for dim in args.dims:
        q = torch.randn(args.queries, dim, generator=gen)
        train = torch.randn(args.rows, dim, generator=gen)
        best = {"matmul": np.inf, "scorer": np.inf, "index": np.inf}
        for _ in range(args.repeats):  # interleaved, best of n: the machine may be shared
            best["matmul"] = min(best["matmul"], time_matmul(q, train, args.tile_rows))
            best["scorer"] = min(best["scorer"], time_scorer(q, train, args.tile_rows, args.topk))
            if not args.no_index:
                best["index"] = min(
                    best["index"],
                    time_index(q, train, args.tile_rows, args.topk, args.shard_rows),
                )
        pairs = args.rows * args.queries
        rate = {name: pairs / t for name, t in best.items()}
        lines.append(
            f"| {dim} | {rate['matmul']:.3g} | {rate['scorer']:.3g} | "
            f"{rate['scorer'] / rate['matmul']:.2f} | {rate['index']:.3g} | "
            f"{rate['index'] / rate['matmul']:.2f} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.write("# All-pairs scoring throughput\n\n`python bench/bench_scoring.py`\n\n")
        f.write(table + "\n")


if __name__ == "__main__":
    main()
