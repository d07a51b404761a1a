"""All-pairs scoring at scale, run as `python -m tests.scale_scoring DIR [options]`.

Writes a synthetic float16 index, builds its preconditioner and scores every query on an
embedded Ray through the Reducer, then checks the top-k of a random subset of queries
against a brute-force float64 computation. Prints one JSON line of timings. Run in a
subprocess by tests/test_score_scale.py, which measures the memory of its process tree.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import ray
import torch

from grass_dist.gradients.computer import PhiBlock
from grass_dist.runtime.reducer import Reducer, ScoreRequest
from grass_dist.scoring import results
from grass_dist.scoring.precondition import Preconditioner
from grass_dist.scoring.score import prepare_queries
from tests.helpers import assert_topk_close
from tests.synthetic import phi_rows, read_all, write_index

LAYERS = {"attn": 64, "mlp": 64}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=5_000)
    ap.add_argument("--topk", type=int, default=1024)
    ap.add_argument("--shard-rows", type=int, default=20_000)
    ap.add_argument("--tile-rows", type=int, default=4096)
    ap.add_argument("--check", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=1)
    args = ap.parse_args()
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    index = write_index(args.dir, args.rows, LAYERS, args.shard_rows, dtype="float16")
    times["write_index"] = time.perf_counter() - t0
    query = PhiBlock(
        np.arange(args.queries, dtype=np.int64),
        [f"q{i}" for i in range(args.queries)],
        phi_rows(10**9, 10**9 + args.queries, LAYERS, seed=1),
    )
    ray.init(
        address="local", num_cpus=args.cpus, include_dashboard=False,
        object_store_memory=200 << 20,
    )  # fmt: skip
    try:
        reducer = ray.remote(Reducer).options(num_cpus=0).remote(args.dir, {}, args.cpus)
        t0 = time.perf_counter()
        ray.get(reducer.build_preconditioner.remote("fisher"))
        times["precondition"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = ray.get(
            reducer.score.remote(query, ScoreRequest(
                "scale", precondition_name="fisher", damping=0.1, kind="influence",
                topk=args.topk, dense=False, self_influence=True, tile_rows=args.tile_rows,
                parallelism=args.tasks, cpus_per_task=args.cpus / args.tasks,
            ))
        )  # fmt: skip
        times["score"] = time.perf_counter() - t0
    finally:
        ray.shutdown()
    t0 = time.perf_counter()
    check(index, query, args)
    times["check"] = time.perf_counter() - t0
    out = {"times": times, "pairs_per_second": summary["pairs_per_second"]}
    print(json.dumps(out))


def check(index, query: PhiBlock, args) -> None:
    """Brute force on a random subset of queries: exact float64 scores over every row."""
    pre = Preconditioner.from_bytes(index.get_artifact("preconditioner/fisher.safetensors"))
    pick = np.sort(np.random.default_rng(0).choice(args.queries, args.check, replace=False))
    sub = {n: x[pick] for n, x in query.phi.items()}
    q = prepare_queries(sub, "influence", pre, 0.1).matrix.double()
    rows, train = read_all(index)
    assert rows.tolist() == list(range(args.rows))
    exact = torch.from_numpy(np.concatenate(list(train.values()), 1)).double() @ q.T
    table = results.load_table(index, "scale", "topk")
    assert table.num_rows == 2 * args.queries * args.topk
    df = table.filter(np.isin(table["query_row"].to_numpy(), pick)).to_pandas()
    tol = 1e-5 * float(exact.abs().max())
    for kind, largest in (("proponent", True), ("opponent", False)):
        part = df[df["kind"] == kind].sort_values(["query_row", "rank"])
        got_r = part["train_row"].to_numpy().reshape(len(pick), args.topk)
        got_v = part["score"].to_numpy().reshape(len(pick), args.topk)
        assert_topk_close(got_r, got_v, exact, args.topk, largest, tol)
    diag = results.load_table(index, "scale", "self_influence")
    assert diag["train_row"].to_pylist() == list(range(args.rows))


if __name__ == "__main__":
    main()
