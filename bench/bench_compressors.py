"""Per-sample cost of every compressor on one Linear layer, against FactGraSS.

    python bench/bench_compressors.py [--d-in 512 --d-out 512 --k 256 --batch 32 --seq 1 16]

For each sequence length T it draws random factors x (B, T, d_in), g (B, T, d_out) and
times `compress(x, g)` of every method (one torch thread, best of `--reps` after a warm-up;
selective_factgrass costs what factgrass costs once its masks are learned, so it is left
out). `gaussian (R regenerated)` is the dense JL with its cache off, the memory-bounded
mode for layers whose R does not fit. Throughput is samples per second; the ratio is
FactGraSS's time over the method's (below 1: slower than FactGraSS).
Writes bench/results/compressors.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grass_dist.compress import LinearShape, build_compressor  # noqa: E402
from grass_dist.compress.dense import GaussianJL  # noqa: E402
from grass_dist.config import CompressionConfig  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compressors.md")
METHODS = ["factgrass", "logra", "grass", "random_mask", "sjlt", "gaussian", "rademacher"]


def best_time(fn, reps: int) -> float:
    fn()  # warm-up (and the dense JL's R)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def compressors(shape: LinearShape, k: int) -> dict:
    cfg = {"k": k, "jl_cache_mb": 4096}  # the dense R (p x k) stays in memory
    out = {m: build_compressor(CompressionConfig(method=m, **cfg), "layer", shape) for m in METHODS}
    out["gaussian (R regenerated)"] = GaussianJL("layer", shape, k, seed=0, cache_bytes=0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-in", type=int, default=512)
    ap.add_argument("--d-out", type=int, default=512)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    shape = LinearShape(args.d_in, args.d_out, True)
    comps = compressors(shape, args.k)
    lines = [
        f"# Compressor cost per sample: Linear {args.d_in} -> {args.d_out} (+bias, "
        f"p = {shape.numel}), k = {args.k}, batch {args.batch}, one CPU thread",
        "",
        f"Command: `python bench/bench_compressors.py --d-in {args.d_in} --d-out {args.d_out} "
        f"--k {args.k} --batch {args.batch} --seq {' '.join(map(str, args.seq))}`",
        "",
        f"Machine load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
        "(timings are noisy under load; the orders of magnitude are the point).",
        "",
        "| T | method | ms / batch | samples / s | FactGraSS time / method time |",
        "|---|---|---|---|---|",
    ]
    gen = torch.Generator().manual_seed(0)
    for t in args.seq:
        x = torch.randn(args.batch, t, args.d_in, generator=gen)
        g = torch.randn(args.batch, t, args.d_out, generator=gen)
        seconds = {
            m: best_time(lambda c=c, x=x, g=g: c.compress(x, g), args.reps)
            for m, c in comps.items()
        }
        for m, s in seconds.items():
            row = (
                f"| {t} | {m} | {s * 1e3:.2f} | {args.batch / s:.0f} | "
                f"{seconds['factgrass'] / s:.3f} |"
            )
            lines.append(row)
            print(row, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
