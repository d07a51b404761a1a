"""What one `Index.attribute` call of the Python API costs: queries by the driver or by workers.

    .venv/bin/python bench/bench_api_attribute.py                 # README's example, 5 pairs
    .venv/bin/python bench/bench_api_attribute.py --reps 9
    .venv/bin/python bench/bench_api_attribute.py --tiny          # seconds

A notebook builds an index once and then calls `index.attribute(...)` again and again (other
queries, other dampings). Each call computes its queries' gradients, the preconditioner
(read back from the store when the index is unchanged) and the scores. For a query set of
one chunk (`index.shard_size` rows) the driver computes the queries' gradients itself, on a
worker's thread count (`grass_dist.runtime.local_shard.driver_phi`); with
`cluster.driver_shard=false` a worker pool starts for them, as for larger query sets. The
two kinds of call run in turn in one process after one index build (README's Python API
example: digits MLP, 300 training rows, k=64, one worker), after one uncounted call each;
their dense scores are checked to be equal bit for bit. Writes
bench/results/api_attribute.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.timing import write_result  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "api_attribute.md"
MODES = {"driver": [], "workers": ["cluster.driver_shard=false"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="timed calls of each kind")
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-query", type=int, default=20)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--tiny", action="store_true", help="a few seconds: 60 rows, 1 rep")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.tiny:
        args.reps, args.n_train, args.n_query, args.k = 1, 60, 5, 16

    work = tempfile.mkdtemp(prefix="bench_api_")
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: str) -> None:
    import numpy as np

    import grass_dist as gd
    from grass_dist.data import digits
    from grass_dist.models.digits import digits_mlp

    n, q = args.n_train, args.n_query
    train, query = digits("train", n_train=n, n_query=q), digits("query", n_train=n, n_query=q)
    model = digits_mlp(hidden=[32], epochs=10, n_train=n, n_query=q, cache_dir=work)
    t0 = time.perf_counter()
    index = gd.Index.build(model, train, store=os.path.join(work, "index"), k=args.k, workers=1,
                           overrides=[f"run.output_dir={work}"])  # fmt: skip
    build_s = time.perf_counter() - t0

    walls: dict[str, list[float]] = {m: [] for m in MODES}
    stages: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    dense: dict[str, np.ndarray] = {}
    for rep in range(args.reps + 1):  # the first round uncounted
        for mode, overrides in MODES.items():
            t0 = time.perf_counter()
            result = index.attribute(query, damping=0.1, topk=5, dense=True, name=mode,
                                     overrides=overrides)  # fmt: skip
            wall = time.perf_counter() - t0
            dense[mode] = result.dense()
            if rep:
                walls[mode].append(wall)
                stages[mode].append(result.summary["stage_seconds"])
    if not np.array_equal(dense["driver"], dense["workers"]):
        raise SystemExit("the driver's and the workers' query gradients gave different scores")

    base = statistics.median(walls["workers"])
    lines = [
        "# One `Index.attribute` call: queries by the driver or by a worker pool",
        "",
        "Command: `python bench/bench_api_attribute.py"
        + (" --tiny" if args.tiny else f" --reps {args.reps}")
        + "`",
        "",
        f"Machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the end "
        "(a shared machine: the two kinds of call alternate, medians of repetitions).",
        "",
        f"Work: README's Python API example (digits MLP [32], {n} training rows, {q} queries, "
        f"FactGraSS k={args.k}, workers=1, damping 0.1, top 5, dense scores); the index built "
        f"once ({build_s:.1f} s), then {args.reps} timed calls of each kind in turn after one "
        "uncounted call each. `driver`: the driver computes the query gradients (a query set "
        "of one chunk, the default); `workers`: `cluster.driver_shard=false`, a worker pool "
        "starts for them. Dense scores of both: equal bit for bit (checked). `x` = the "
        "`workers` call's median wall / this row's.",
        "",
        "| queries by | wall s (median) | wall s (runs) | x | median stage seconds |",
        "|---|---|---|---|---|",
    ]
    for mode in MODES:
        wall = statistics.median(walls[mode])
        names = list(stages[mode][0])
        median = {s: statistics.median(r.get(s, 0.0) for r in stages[mode]) for s in names}
        shown = ", ".join(f"{s} {v:.2f}" for s, v in median.items())
        runs = ", ".join(f"{w:.2f}" for w in walls[mode])
        lines.append(f"| {mode} | {wall:.2f} | {runs} | {base / wall:.2f} | {shown} |")
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
