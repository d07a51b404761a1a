"""What one `Index.attribute` call of the Python API costs, and what it starts.

    .venv/bin/python bench/bench_api_attribute.py                 # README's example, 5 rounds
    .venv/bin/python bench/bench_api_attribute.py --reps 9
    .venv/bin/python bench/bench_api_attribute.py --tiny          # seconds

A notebook builds an index once and then calls `index.attribute(...)` again and again (other
queries, other dampings). Each call computes its queries' gradients, the preconditioner
(read back from the store when the index is unchanged) and the scores. Three kinds of call:
- `before`: as each call ran before: a worker pool started for the queries'
  gradients (`cluster.driver_shard=false`), and a reducer process started for the
  preconditioner and the scores (`cluster.driver_reduce_mib=0`; `index.close()` first
  stops the one kept);
- `kept reducer`: the same, on the reducer process the Index keeps between calls;
- `now`: the default: the driver computes the queries' gradients itself (a query set of one
  chunk, `index.shard_size` rows), on a worker's thread count
  (`grass_dist.runtime.local_shard.driver_phi`), and reduces this small index itself (the
  reducer is an object of the calling process, kept between calls).
They run in turn in one process after one index build (README's Python API example: digits
MLP, 300 training rows, 20 queries, k=64, one worker), after one uncounted round; their
dense scores are checked to be equal bit for bit. Writes bench/results/api_attribute.md.
"""

from __future__ import annotations

import argparse
import os
import re
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
# name -> (close the kept reducer first, overrides)
MODES = {
    "before": (True, ["cluster.driver_shard=false", "cluster.driver_reduce_mib=0"]),
    "kept reducer": (False, ["cluster.driver_shard=false", "cluster.driver_reduce_mib=0"]),
    "now": (False, []),
}
ROW = "now, in a row"  # `now` calls one after another


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

    walls: dict[str, list[float]] = {m: [] for m in [*MODES, ROW]}
    stages: dict[str, list[dict[str, float]]] = {m: [] for m in walls}
    dense: dict[str, np.ndarray] = {}

    def call(mode: str, counted: bool) -> None:
        close, overrides = MODES.get(mode, MODES["now"])
        if close:
            index.close()
        t0 = time.perf_counter()
        result = index.attribute(query, damping=0.1, topk=5, dense=True,
                                 name=re.sub(r"\W+", "_", mode), overrides=overrides)  # fmt: skip
        wall = time.perf_counter() - t0
        dense[mode] = result.dense()
        if counted:
            walls[mode].append(wall)
            stages[mode].append(result.summary["stage_seconds"])

    for rep in range(args.reps + 1):  # the first round uncounted
        for mode in MODES:
            call(mode, rep > 0)
    # A notebook's calls follow each other: the process and the Ray processes a `before`
    # call starts and stops (its worker, its reducer) are not in between.
    for _ in range(args.reps):
        call(ROW, True)
    index.close()
    for mode in walls:
        if not np.array_equal(dense[mode], dense["before"]):
            raise SystemExit(f"the {mode!r} call's scores differ from the 'before' call's")

    base = statistics.median(walls["before"])
    lines = [
        "# One `Index.attribute` call: what it starts",
        "",
        "Command: `python bench/bench_api_attribute.py"
        + (" --tiny" if args.tiny else f" --reps {args.reps}")
        + "`",
        "",
        f"Machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the end "
        "(a shared machine: the kinds of call alternate, medians of repetitions).",
        "",
        f"Work: README's Python API example (digits MLP [32], {n} training rows, {q} queries, "
        f"FactGraSS k={args.k}, workers=1, damping 0.1, top 5, dense scores); the index built "
        f"once ({build_s:.1f} s), then {args.reps} rounds of the three kinds of call in turn "
        "after one uncounted round. `before`: a worker pool starts for the query gradients "
        "(`cluster.driver_shard=false`) and a reducer process for the preconditioner and "
        "scores (`cluster.driver_reduce_mib=0`; the kept one closed first), as every call "
        "did before; `kept reducer`: the same on the reducer process the Index keeps between "
        "calls; `now` (the default): the driver computes the query gradients and reduces "
        "this small index itself. Then `now, in a row`: as "
        "many `now` calls one after another, as a notebook makes them (in the rounds, each "
        "`now` call follows the two others, whose worker and reducer processes come and go "
        "and take the CPU meanwhile). Dense scores of "
        "every call: equal bit for bit (checked). `x` = the `before` call's median wall / "
        "this row's.",
        "",
        "| call | wall s (median) | wall s (runs) | x | median stage seconds |",
        "|---|---|---|---|---|",
    ]
    for mode in walls:
        wall = statistics.median(walls[mode])
        names = list(stages[mode][0])
        median = {s: statistics.median(r.get(s, 0.0) for r in stages[mode]) for s in names}
        shown = ", ".join(f"{s} {v:.2f}" for s, v in median.items())
        runs = ", ".join(f"{w:.2f}" for w in walls[mode])
        lines.append(f"| {mode} | {wall:.2f} | {runs} | {base / wall:.2f} | {shown} |")
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
