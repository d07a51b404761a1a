"""The capture's fast paths on a causal LM: one index batch with and without them.

On bench_vs_bergson.py's model and documents (GPT-2, 4 blocks of width 256, vocabulary
8192, documents of 256 tokens, 512 padded tokens per batch, FactGraSS k=256 on the 16
block projections), two GradientComputers on the same model compute every batch's phi,
interleaved: one as indexing runs (`causal_lm()`: the fused head and loss, and GPT-2's
`gelu_new` as PyTorch's tanh GELU kernel, the attention in blocks of query rows, the
products through oneDNN; docs/language_models.md), one on the usual path
(`causal_lm(fused_head=False)`, no kernel swap, the attention in one call). With 2 or more
threads a third computes the fast paths in lanes as a worker of that many CPUs does
(`cluster.cpu_lanes`: a batch per thread at once). The one-thread path (the lanes, or the
fast paths with `--threads 1`) runs two elementwise steps as C loops
(grass_dist/gradients/native.py); it is timed once more with PyTorch's kernels in their
place, once more with the causal attention in transformers' one call rather than in blocks
of query rows (grass_dist/gradients/causal_attention.py), and once more with PyTorch's
matrix products (its BLAS) in the Linear layers and the head rather than oneDNN's
(grass_dist/gradients/dnn_linear.py). It reports milliseconds per batch (median of rounds,
each over every batch), their ratios, how far the two paths' phi differ, the GFLOP/s of each
of a batch's matrix products on one thread through PyTorch and through oneDNN, and with
`--profile` the ops that take a batch's time on each path (`torch.profiler`).

    python bench/bench_fast_paths.py --docs 64 --rounds 3 --profile
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lm_workload import Size, build_workload, checked_token_ids  # noqa: E402
from bench.timing import write_result  # noqa: E402
from bench.vs_bergson_sides import module_names  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "fast_paths.md"
PROFILED_OPS = 10


def computers(model, size: Size, k: int, lanes: int = 1):
    """(fast, usual) GradientComputers on `model`: as indexing runs it (in `lanes` lanes),
    and the usual path."""
    from grass_dist.compress import build_compressors
    from grass_dist.config import CompressionConfig
    from grass_dist.gradients import causal_attention
    from grass_dist.gradients.capture import resolve_layers
    from grass_dist.gradients.computer import GradientComputer
    from grass_dist.tasks.language_model import causal_lm

    shapes = resolve_layers(model, module_names(size))
    comps = build_compressors(CompressionConfig(method="factgrass", k=k, seed=0), shapes)
    fast = GradientComputer(model, causal_lm(), comps, "cpu", lanes)
    usual = GradientComputer(model, causal_lm(fused_head=False), comps)
    usual.fused = []  # no module runs as a fused kernel
    blocked = usual.phi_batch

    def phi_batch(batch):  # and attention runs in transformers' one call
        with causal_attention.one_call():
            return blocked(batch)

    usual.phi_batch = phi_batch
    return fast, usual


def per_batch_ms(computer, batches) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        computer.phi_batch(batch)
    return (time.perf_counter() - t0) / len(batches) * 1000


def laned_ms(computer, batches) -> float:
    """Milliseconds per batch of `phi_loaded` over every batch: in the computer's lanes."""
    import numpy as np

    from grass_dist.gradients.computer import LoadedRows

    n = 2 * len(batches)
    loaded = LoadedRows(
        row_ids=np.arange(n),
        keys=[str(i) for i in range(n)],
        digests=np.zeros((n, 32), np.uint8),
        batches=[([2 * i, 2 * i + 1], batch) for i, batch in enumerate(batches)],
    )
    t0 = time.perf_counter()
    computer.phi_loaded(loaded)
    return (time.perf_counter() - t0) / len(batches) * 1000


def product_rates(model, rows: int, repeats: int = 5) -> list[str]:
    """Table lines: GFLOP/s on one thread of an index batch's matrix products (each block
    Linear layer's forward and input gradient, the head's two), PyTorch's (`F.linear`)
    against oneDNN's (`dnn_linear.linear`), interleaved, medians of `repeats`."""
    import torch.nn.functional as F

    from grass_dist.gradients import dnn_linear
    from grass_dist.gradients.fast_paths import fusable_modules

    if not dnn_linear.available():
        return ["oneDNN's products are not usable in this process: no table."]
    weights = {}  # (out, in) -> that form of a weight
    for module, _ in fusable_modules(model):
        if dnn_linear.routed(module):
            w = module.weight if isinstance(module, torch.nn.Linear) else module.weight.t()
            weights.setdefault(tuple(w.shape), w.detach())
    head = model.get_output_embeddings().weight.detach()
    weights.setdefault(tuple(head.shape), head)
    products = {}  # name -> (x, weight as (out, in)): forward and input gradient, once each
    gen = torch.Generator().manual_seed(0)
    for (d_out, d_in), w in weights.items():
        for n_in, n_out, form in ((d_in, d_out, w), (d_out, d_in, w.t())):
            x = torch.randn(rows, n_in, generator=gen)
            products.setdefault(f"{rows} x {n_in} -> {n_out}", (x, form))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lines = [
        "| product (rows x in -> out) | PyTorch GFLOP/s | oneDNN GFLOP/s | x |",
        "|---|---|---|---|",
    ]
    try:
        for name, (x, w) in products.items():
            flops = 2 * x.shape[0] * x.shape[1] * w.shape[0]
            runs: dict[str, list[float]] = {"pytorch": [], "onednn": []}
            for _ in range(repeats):
                for side, fn in (("pytorch", F.linear), ("onednn", dnn_linear.linear)):
                    fn(x, w)
                    t0 = time.perf_counter()
                    fn(x, w)
                    runs[side].append(flops / (time.perf_counter() - t0) / 1e9)
            ours, theirs = statistics.median(runs["onednn"]), statistics.median(runs["pytorch"])
            lines.append(f"| {name} | {theirs:.0f} | {ours:.0f} | {ours / theirs:.2f} |")
    finally:
        torch.set_num_threads(threads)
    return lines


def phi_difference(fast, usual, batches) -> float:
    """The largest relative difference of a layer's phi between the two, over the batches."""
    worst = 0.0
    for batch in batches:
        a, b = fast.phi_batch(batch), usual.phi_batch(batch)
        for name in a:
            worst = max(worst, float((a[name] - b[name]).norm() / b[name].norm()))
    return worst


def profiled(computer, batches) -> list[tuple[str, float]]:
    """(op, ms per batch) of the ops with the most self CPU time over `batches`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            computer.phi_batch(batch)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1000 / len(batches)) for e in ops[:PROFILED_OPS]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=64, help="documents (two per batch)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=256, help="FactGraSS dimensions per module")
    ap.add_argument("--profile", action="store_true", help="also list each path's top ops")
    ap.add_argument("--tiny", action="store_true", help="2 blocks of width 64, 32 tokens")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.tiny:
        size = Size(docs=8, tokens=32, blocks=2, width=64, heads=2, vocab=1024)
    else:
        size = Size(args.docs, 256, blocks=4, width=256, heads=4, vocab=8192)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]

    from transformers import GPT2LMHeadModel

    from grass_dist.gradients import causal_attention, dnn_linear, native
    from grass_dist.tasks.language_model import causal_lm

    with tempfile.TemporaryDirectory(prefix="fast_paths-") as work:
        model_dir, corpus = build_workload(size, Path(work))
        ids = checked_token_ids(model_dir, corpus, size)
        model = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32)
    task = causal_lm()
    batches = [
        task.collate([torch.tensor(r) for r in ids[i : i + 2]]) for i in range(0, len(ids), 2)
    ]
    fast, usual = computers(model, size, args.k)
    laned = computers(model, size, args.k, lanes=args.threads)[0] if args.threads > 1 else None
    fast.phi_batch(batches[0])  # the first batch of each watches the head
    usual.phi_batch(batches[0])
    lanes_row = f"fast paths, {args.threads} lanes of 1 thread"
    times: dict[str, list[float]] = {"fast paths": [], "usual path": []}
    if laned is not None:
        laned_ms(laned, batches[: 2 * args.threads])  # each lane's first batch watches the head
        times[lanes_row] = []
    one_thread = lanes_row if laned is not None else "fast paths"  # where the C loops run
    # The one-thread path once more with each of its parts swapped back for PyTorch's.
    swapped = {
        f"{one_thread}, PyTorch's kernels for the C loops": native.pytorch_kernels,
        f"{one_thread}, attention in one call": causal_attention.one_call,
        f"{one_thread}, PyTorch's GEMMs (its BLAS) for oneDNN's": dnn_linear.pytorch_gemms,
    }
    times.update((name, []) for name in swapped)
    for _ in range(args.rounds):
        times["fast paths"].append(per_batch_ms(fast, batches))
        times["usual path"].append(per_batch_ms(usual, batches))
        if laned is not None:
            times[lanes_row].append(laned_ms(laned, batches))
        for name, pytorchs in swapped.items():
            with pytorchs():
                times[name].append(
                    laned_ms(laned, batches) if laned is not None else per_batch_ms(fast, batches)
                )
    fast_ms, usual_ms = (statistics.median(times[k]) for k in ("fast paths", "usual path"))
    lines = [
        "# The capture's fast paths: an index batch with and without them",
        "",
        f"Command: `python bench/bench_fast_paths.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads; "
        f"load average at start {load:.1f} (a shared machine: the paths interleaved per round).",
        "",
        f"Work: GPT-2 ({size.blocks} blocks, width {size.width}, vocabulary {size.vocab}), "
        f"{len(ids)} documents of {size.tokens} tokens, 2 per batch ({len(batches)} batches), "
        f"FactGraSS k={args.k} on {len(fast.compressors)} modules; `phi_batch` per batch.",
        "",
        "| path | ms per batch (median) | rounds | x |",
        "|---|---|---|---|",
    ]
    for name, runs in times.items():
        median = statistics.median(runs)
        shown = ", ".join(f"{r:.1f}" for r in runs)
        lines.append(f"| {name} | {median:.1f} | {shown} | {median / fast_ms:.2f} |")
    lines += [
        "",
        f"phi: largest relative difference of a layer's between the two, over every batch: "
        f"{phi_difference(fast, usual, batches):.1e}.",
    ]
    lines += [
        "",
        "The matrix products of a batch on one thread, PyTorch's and oneDNN's "
        "(`grass_dist/gradients/dnn_linear.py`):",
        "",
        *product_rates(model, 2 * size.tokens),
    ]
    if args.profile:
        for name, computer in (("fast paths", fast), ("usual path", usual)):
            lines += ["", f"Top ops of a batch, {name} (self CPU time):", ""]
            lines += ["| op | ms per batch |", "|---|---|"]
            lines += [f"| `{op}` | {ms:.2f} |" for op, ms in profiled(computer, batches)]
    write_result(args.out, lines)
    print(", ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in times.items()), "per batch")


if __name__ == "__main__":
    main()
