"""Preconditioner build time versus layers L and k: before and now, interleaved, in one run.

    python bench/bench_precondition.py            # about 15 minutes on 2 loaded cores
    python bench/bench_precondition.py --tiny     # seconds (tests/test_bench.py)

- before: the build as grass_dist made it until Cholesky (`before_build`, reproduced here):
  phi^T phi per shard in float64 GEMMs, then torch.linalg.eigh of each layer's H, one layer
  after another;
- now: `FisherSum.accumulate` over the shards, as a map task does (float64 GEMMs of the
  upper triangle over 1024-row blocks gathered across shards), then
  `Preconditioner.factorise` (Cholesky of H + lambda I) with the layers as parallel Ray
  tasks (`runtime.fisher.layer_map`, --cpus tasks).

One synthetic phi (rows x k, power-law spectrum) stands for every layer: the cost does not
depend on the values. Part 1 times each step for one layer (1 torch thread, so CPU time is
the work done whatever else runs; interleaved, median of --reps). Part 2 times whole builds
for every (k, L) whose work L * (k / 1024)^3 is at most --max-work; larger ones are given by
the model of part 1 (before = L (fisher64 + eigh); now = L fisher_now + ceil(L / cpus)
cholesky), labelled as such. The Fisher sums run serially here in both: in a job they are
spread over shards by the same map tasks before and now.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import ray
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.timing import interleaved, machine_note  # noqa: E402
from grass_dist.runtime.fisher import layer_map  # noqa: E402
from grass_dist.scoring.fisher_sum import FisherSum  # noqa: E402
from grass_dist.scoring.precondition import (  # noqa: E402
    Preconditioner,
    cholesky_factor,
    eigen_factor,
)

DELTA = 1e-3


def synthetic_phi(rows: int, k: int, seed: int = 0) -> np.ndarray:
    """float32 (rows, k) with eigenvalues of H falling as 1 / i, like compressed gradients."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
    basis, _ = torch.linalg.qr(torch.randn(k, k, generator=gen))
    return ((torch.randn(rows, k, generator=gen) * scale) @ basis.T).numpy()


def shards_of(x: np.ndarray, shard_rows: int) -> list[np.ndarray]:
    return [x[lo : lo + shard_rows] for lo in range(0, len(x), shard_rows)]


def gram64(x: np.ndarray) -> np.ndarray:
    """phi^T phi as before: one float64 GEMM of the whole shard."""
    x64 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    return (x64.T @ x64).numpy()


def before_build(shards: list[np.ndarray], layers: list[str]) -> dict:
    """The build before Cholesky: float64 Fisher sums, then eigh layer after layer."""
    n = sum(len(s) for s in shards)
    out = {}
    for name in layers:
        h = torch.from_numpy(sum(gram64(s) for s in shards) / n)
        out[name] = eigen_factor(h)
    return out


def now_build(shards: list[np.ndarray], layers: list[str], cpus: int) -> Preconditioner:
    """The build now: upper-triangle Fisher sums, Cholesky with the layers as parallel Ray
    tasks."""
    total = FisherSum.accumulate(dict.fromkeys(layers, s) for s in shards)
    return Preconditioner.from_fisher(total).factorise(DELTA, layer_map(cpus))


def per_layer(x: np.ndarray, shard_rows: int, reps: int) -> dict[str, float]:
    """Median wall and CPU seconds of each step for one layer."""
    shards = shards_of(x, shard_rows)
    h = torch.from_numpy(sum(gram64(s) for s in shards) / len(x))
    steps = {
        "fisher64": lambda: [gram64(s) for s in shards],
        "fisher_now": lambda: FisherSum.accumulate({"x": s} for s in shards),
        "eigh": lambda: eigen_factor(h),
        "cholesky": lambda: cholesky_factor(h, DELTA),
    }
    t = interleaved(steps, reps, warmup=0)
    return {
        f"{name}_{kind}": getattr(v, f"{kind}_s")
        for name, v in t.items()
        for kind in ("wall", "cpu")
    }


def start_ray_workers(cpus: int) -> None:
    """Start the Ray worker processes once, so that no build pays their start-up."""
    tiny = {f"w{i}": torch.eye(2, dtype=torch.float64) for i in range(cpus)}
    layer_map(cpus)(eigen_factor, tiny)


def model(cost: dict[str, float], layers: int, cpus: int) -> tuple[float, float]:
    """(before, now) wall seconds of a build of `layers` layers from one layer's costs."""
    before = layers * (cost["fisher64_wall"] + cost["eigh_wall"])
    now = layers * cost["fisher_now_wall"] + math.ceil(layers / cpus) * cost["cholesky_wall"]
    return before, now


def markdown(args, costs: dict[int, dict], builds: list[dict]) -> str:
    lines = [
        "# Preconditioner build time versus layers and k",
        "",
        f"`python bench/bench_precondition.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"{machine_note(1)}; rows {args.rows} in shards of {args.shard_rows}; "
        f"delta {DELTA}; now: {args.cpus} parallel factorisation tasks.",
        "",
        f"## One layer (1 torch thread; median of {args.reps}, interleaved; seconds wall / CPU)",
        "",
        "| k | Fisher before (float64) | Fisher now (float64, upper triangle) | eigh | Cholesky "
        "| eigh / Cholesky (CPU) | Fisher before / now (CPU) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, c in costs.items():
        cells = [f"{c[f'{s}_wall']:.3g} / {c[f'{s}_cpu']:.3g}" for s in
                 ("fisher64", "fisher_now", "eigh", "cholesky")]  # fmt: skip
        lines.append(
            f"| {k} | {' | '.join(cells)} | {c['eigh_cpu'] / c['cholesky_cpu']:.1f}x "
            f"| {c['fisher64_cpu'] / c['fisher_now_cpu']:.1f}x |"
        )
    lines += [
        "",
        "## Whole build (wall seconds; measured: median of "
        f"{args.build_reps}, before and now interleaved)",
        "",
        "| k | layers | before: s | now: s | before / now | how |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for b in builds:
        lines.append(
            f"| {b['k']} | {b['layers']} | {b['before']:.3g} | {b['now']:.3g} | "
            f"{b['before'] / b['now']:.1f}x | {b['how']} |"
        )
    lines += [
        "",
        "Model: before = L (fisher64 + eigh); now = L fisher_now + ceil(L / tasks) cholesky, "
        f"with tasks = {args.cpus} here (one layer's times from the first table). Rows "
        "scale the Fisher terms linearly; k scales Fisher as k^2 and factorisations as k^3.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 16, 64])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument(
        "--shard-rows", type=int, default=128, help="rows per shard (index.shard_size)"
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions of part 1")
    parser.add_argument("--build-reps", type=int, default=1, help="repetitions of part 2")
    parser.add_argument("--max-work", type=float, default=128, help="L (k/1024)^3 measured")
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs: factorisation tasks")
    parser.add_argument("--tiny", action="store_true", help="k 32 64, 2 and 4 layers, 300 rows")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "precondition.md"))
    args = parser.parse_args()
    if args.tiny:
        args.ks, args.layers, args.rows, args.shard_rows, args.reps = [32, 64], [2, 4], 300, 100, 1
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, configure_logging=False)
    start_ray_workers(args.cpus)
    costs, builds = {}, []
    for k in args.ks:
        x = synthetic_phi(args.rows, k)
        costs[k] = per_layer(x, args.shard_rows, args.reps)
        print(k, costs[k], flush=True)
        for n_layers in args.layers:
            names = [f"layer{i}" for i in range(n_layers)]
            if n_layers * (k / 1024) ** 3 <= args.max_work:
                shards = shards_of(x, args.shard_rows)
                t = interleaved(
                    {
                        "before": lambda s=shards, n=names: before_build(s, n),
                        "now": lambda s=shards, n=names: now_build(s, n, args.cpus),
                    },
                    args.build_reps,
                    warmup=0,
                )
                row = {"before": t["before"].wall_s, "now": t["now"].wall_s, "how": "measured"}
            else:
                before, now = model(costs[k], n_layers, args.cpus)
                row = {"before": before, "now": now, "how": "model (not measured)"}
            builds.append({"k": k, "layers": n_layers, **row})
            print(builds[-1], flush=True)
    ray.shutdown()
    text = markdown(args, costs, builds)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
