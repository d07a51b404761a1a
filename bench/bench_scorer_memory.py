"""Scorer memory against the size of the training set: peak PSS at 200k and at 2M train rows.

    python bench/bench_scorer_memory.py                      # 200k and 2M rows x 1k queries
    python bench/bench_scorer_memory.py --sizes 3000 30000 --queries 20 --dims 16 \
        --shard-rows 1000                                    # tiny (tests/test_bench.py)

For each size, a synthetic float16 index (two layers of `--dims` columns, shards of
`--shard-rows` rows, so K = 2 x dims) is written, with a preconditioner built from the
Fisher of its first shard (the benchmark measures scoring; how the preconditioner was
built does not change what scoring holds). Then one child process starts an embedded Ray
with `--cpus` CPUs and, for each size in turn, scores `--queries` queries through a new
Reducer (influence, top-k `--topk`, self-influence on, dense off, one scorer task per
CPU): the real path, including the self-influence parts and the key look-up of the ranked
rows. A warm-up run on the smallest index comes first, so starting Ray is in neither
measurement; the memory peak is reset between runs.

Memory is the peak, over samples every 50 ms, of the summed proportional set size (PSS)
of the child's process tree (driver, Ray daemons, reducer, scorer workers; see
tests/memwatch.py). Bounded scorer memory means the two peaks agree although one training
set is ten times the other. After each run the results are checked: the self-influence
table has every train row with its key, and the top-k of `--check` queries matches a
float64 brute force over all rows.

Results: printed and written to bench/results/scorer_memory.md (or `--out`).
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
import uuid
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grass_dist.index import GradientIndex  # noqa: E402
from grass_dist.runtime.reducer import preconditioner_path  # noqa: E402
from grass_dist.scoring import results  # noqa: E402
from grass_dist.scoring.fisher_sum import FisherSum  # noqa: E402
from grass_dist.scoring.precondition import Preconditioner  # noqa: E402
from grass_dist.scoring.score import concat, prepare_queries  # noqa: E402
from tests.helpers import assert_topk_close  # noqa: E402
from tests.memwatch import TreeMemory  # noqa: E402
from tests.synthetic import phi_rows, write_index  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "scorer_memory.md"
GIB = 1 << 30
DAMPING = 0.1


def _layers(dims: int) -> dict[str, int]:
    return {"attn": dims, "mlp": dims}


def _queries(n: int, dims: int) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    return (
        np.arange(n, dtype=np.int64),
        [f"q{i}" for i in range(n)],
        phi_rows(10**9, 10**9 + n, _layers(dims), seed=1),
    )


def write(url: str, rows: int, args) -> float:
    """The synthetic index and its preconditioner -> seconds taken."""
    t0 = time.perf_counter()
    index = write_index(url, rows, _layers(args.dims), args.shard_rows, dtype="float16")
    first = min(index.committed().values(), key=lambda r: r.start)
    pre = Preconditioner.from_fisher(FisherSum.of(index.read(first).phi))
    index.put_artifact(preconditioner_path("fisher"), pre.to_bytes())
    return time.perf_counter() - t0


def child(args) -> None:
    """Score each index of `--child` through one Reducer on one embedded Ray.

    The first index is scored once more up front, unmeasured, so that starting Ray and its
    workers falls in no measured run. After each run, one JSON line goes to stdout and the
    child waits for a line on stdin (the parent resets its memory peak in between).
    """
    import ray

    from grass_dist.gradients.computer import PhiBlock
    from grass_dist.runtime.reducer import Reducer, ScoreRequest

    query = PhiBlock(*_queries(args.queries, args.dims))
    ray.init(
        address="local", num_cpus=args.cpus, include_dashboard=False,
        object_store_memory=200 << 20,
    )  # fmt: skip
    try:
        for url in [args.child[0], *args.child]:
            reducer = ray.remote(Reducer).options(num_cpus=0).remote(url, {}, args.cpus)
            t0 = time.perf_counter()
            summary = ray.get(
                reducer.score.remote(query, ScoreRequest(
                    "mem", precondition_name="fisher", damping=DAMPING, kind="influence",
                    topk=args.topk, dense=False, self_influence=True,
                    tile_rows=args.tile_rows, parallelism=args.cpus, cpus_per_task=1.0,
                ))
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            ray.kill(reducer)
            out = {"seconds": seconds, "pairs_per_second": summary["pairs_per_second"]}
            print(json.dumps(out), flush=True)
            sys.stdin.readline()
    finally:
        ray.shutdown()


def measure(urls: list[str], args) -> list[dict]:
    """Run the child on `urls`, sampling its process tree's memory; one dict per url."""
    tag = uuid.uuid4().hex
    env = {**os.environ, "GRASS_DIST_MEMTAG": tag}
    cmd = [sys.executable, __file__, *_passed(args), "--child", *urls]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    runs = []
    with TreeMemory(proc.pid, f"GRASS_DIST_MEMTAG={tag}") as mem:
        try:
            for i in range(len(urls) + 1):  # the warm-up, then each url
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"scoring child failed (exit {proc.wait()})")
                if i:
                    top = sorted(mem.at_peak, key=lambda x: -x[2])[:6]
                    runs.append({
                        **json.loads(line),
                        "peak_pss": mem.peak_pss,
                        "peak_rss": mem.peak_rss,
                        "processes": mem.max_processes,
                        "at_peak": [(name, pss) for name, _, pss in top],
                    })  # fmt: skip
                mem.reset()
                proc.stdin.write("\n")
                proc.stdin.flush()
            proc.wait(timeout=args.timeout)
        finally:
            proc.kill()
    return runs


def check(url: str, rows: int, args) -> None:
    """Self-influence covers every row with its key; top-k of a few queries is exact."""
    index = GradientIndex.open(url, {})
    diag = results.load_table(index, "mem", "self_influence")
    assert diag.num_rows == rows
    assert np.array_equal(diag["train_row"].to_numpy(), np.arange(rows))
    assert diag["train_key"][rows - 1].as_py() == f"row-{rows - 1}"
    assert np.isfinite(diag["self_influence"].to_numpy()).all()
    pre = Preconditioner.from_bytes(index.get_artifact(preconditioner_path("fisher")))
    _, _, phi = _queries(args.queries, args.dims)
    pick = np.linspace(0, args.queries - 1, args.check).astype(np.int64)
    q = prepare_queries({n: x[pick] for n, x in phi.items()}, "influence", pre, DAMPING)
    exact = torch.cat(
        [concat(data.phi).double() @ q.matrix.double().T for _, data in index.iter_committed()]
    )  # (rows, check): rows in shard order, which is row order here
    table = results.load_table(index, "mem", "topk").to_pandas()
    assert len(table) == 2 * args.queries * args.topk
    assert (table["train_key"] == "row-" + table["train_row"].astype(str)).all()
    part = table[table["query_row"].isin(pick)]
    tol = 1e-5 * float(exact.abs().max())
    for kind, largest in (("proponent", True), ("opponent", False)):
        got = part[part["kind"] == kind].sort_values(["query_row", "rank"])
        got_r = got["train_row"].to_numpy().reshape(len(pick), args.topk)
        got_v = got["score"].to_numpy().reshape(len(pick), args.topk)
        assert_topk_close(got_r, got_v, exact, args.topk, largest, tol)


def _passed(args) -> list[str]:
    return [
        "--queries", str(args.queries), "--topk", str(args.topk), "--dims", str(args.dims),
        "--tile-rows", str(args.tile_rows), "--cpus", str(args.cpus),
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[200_000, 2_000_000])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--dims", type=int, default=128, help="columns per layer (2 layers)")
    ap.add_argument("--shard-rows", type=int, default=20_000)
    ap.add_argument("--tile-rows", type=int, default=4096)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--check", type=int, default=8, help="queries checked by brute force")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--workdir", default=None, help="where the indexes go (default: a temp dir)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    work = Path(tempfile.mkdtemp(prefix="scorer_mem_", dir=args.workdir))
    try:
        urls = [str(work / f"index_{rows}") for rows in args.sizes]
        written = [write(url, rows, args) for url, rows in zip(urls, args.sizes, strict=True)]
        runs = measure(urls, args)
        for url, rows, run, w in zip(urls, args.sizes, runs, written, strict=True):
            check(url, rows, args)
            run.update(rows=rows, write_seconds=w)
            print(json.dumps(run), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(runs, args)
    print(text)
    Path(args.out).write_text(text)


def report(runs: list[dict], args) -> str:
    small, big = runs
    lines = [
        "# Scorer memory against training-set size",
        "",
        f"`python bench/bench_scorer_memory.py --sizes {small['rows']} {big['rows']} "
        f"--queries {args.queries} --topk {args.topk} --dims {args.dims} "
        f"--shard-rows {args.shard_rows}`",
        "",
        f"Synthetic float16 index, 2 layers x {args.dims} columns (K = {2 * args.dims}), shards "
        f"of {args.shard_rows} rows; {args.queries} queries, influence, top-k {args.topk}, "
        f"self-influence on, dense off; Reducer on an embedded Ray with {args.cpus} CPUs, one "
        "scorer task per CPU. Peak PSS: summed over the scoring process tree (driver, Ray "
        "daemons, reducer, scorers), sampled every 50 ms. Results checked after each run "
        f"(self-influence has every row with its key; top-k of {args.check} queries equals a "
        "float64 brute force).",
        "",
        "| train rows | shards | score s | pairs/s | peak PSS GiB | peak RSS sum GiB | processes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['rows']} | {-(-r['rows'] // args.shard_rows)} | {r['seconds']:.1f} "
            f"| {r['pairs_per_second']:.3g} | {r['peak_pss'] / GIB:.3f} "
            f"| {r['peak_rss'] / GIB:.3f} | {r['processes']} |"
        )
    ratio = big["peak_pss"] / small["peak_pss"]
    lines += [
        "",
        f"Peak PSS ratio ({big['rows']} / {small['rows']} rows): **{ratio:.3f}** "
        f"({(ratio - 1) * 100:+.1f} %) for {big['rows'] / small['rows']:.0f}x the rows.",
        "",
        f"Largest processes at the {big['rows']}-row peak (PSS MiB):",
        "",
    ]
    lines += [f"- {pss / 2**20:.0f} {name}" for name, pss in big["at_peak"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
