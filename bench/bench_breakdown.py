"""Where the time of a FactGraSS index build goes, phase by phase, on CPU.

    .venv/bin/python bench/bench_breakdown.py                   # GPT-shaped, k = 4096
    .venv/bin/python bench/bench_breakdown.py --model mlp --batch 256 --k 1024

One shard of `--shard-batches` distinct batches goes through the index workers' steps, with
process CPU time (one torch thread) taken between them:
- forward (with capture hooks), backward to the layer outputs (`LinearCapture.factors`);
- per layer: mask/gather (masked columns of g and x), outer products (the per-sample
  bmm over the sequence and the bias column's sums), SJLT (sign and bucket accumulation);
- phi to host arrays with the finiteness check (`GradientComputer.phi_rows`' per-batch work);
- serialisation (`write_shard`'s Parquet encoding), write (its local-disk put) and the
  shard's sha256 (for the manifest).
The compression steps are `MaskedFactors.compress` split open; every batch checks that they
give exactly its phi. For reference, in the same cycle: the forward without hooks (the hooks
cost the difference) and a plain training forward + backward (not part of the shares).
The cycle repeats `--reps` times; medians per phase. Writes bench/results/breakdown.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.models import CausalLMTask, digits_mlp_shape, gpt, linear_names, token_batch  # noqa: E402
from bench.timing import machine_note, write_result  # noqa: E402
from grass_dist.compress import build_compressors  # noqa: E402
from grass_dist.compress.linear import _CHUNK_FLOATS, MaskedFactors, gather_columns  # noqa: E402
from grass_dist.compress.sketch import scatter_signed  # noqa: E402
from grass_dist.config import CompressionConfig  # noqa: E402
from grass_dist.gradients.capture import resolve_layers  # noqa: E402
from grass_dist.gradients.computer import GradientComputer, all_finite  # noqa: E402
from grass_dist.gradients.fast_paths import activation_gradients  # noqa: E402
from grass_dist.index.shards import write_shard  # noqa: E402
from grass_dist.index.store import Store  # noqa: E402
from grass_dist.tasks.classifier import ClassificationTask  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "breakdown.md"
PHASES = [
    "forward (with capture hooks)",
    "backward to layer outputs",
    "mask/gather",
    "outer products",
    "SJLT",
    "phi to host + finiteness check",
    "serialisation (Parquet encode)",
    "write (local disk)",
    "sha256 of the shard",
]
REFERENCE = ["forward without hooks", "plain fwd+bwd (training step)"]


class Clock:
    """Accumulates process CPU seconds into named phases."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.last = time.process_time()

    def lap(self, phase: str) -> None:
        now = time.process_time()
        self.spent[phase] += now - self.last
        self.last = now


def compress_in_phases(comp: MaskedFactors, x, g, clock: Clock) -> torch.Tensor:
    """`MaskedFactors.compress`, one step at a time (same private plan, same operations)."""
    g = gather_columns(g, comp._out_cols).float()
    a = gather_columns(x, comp._in_cols).float()
    clock.lap("mask/gather")
    out = torch.zeros(x.shape[0], comp.k)
    step = max(1, _CHUNK_FLOATS // max(1, g.shape[2] * a.shape[2]))
    for lo in range(0, x.shape[0], step):
        gs, xs = g[lo : lo + step], a[lo : lo + step]
        if a.shape[1] == 1:
            main = gs[:, 0, :, None] * xs[:, 0, None, :]
        else:
            main = torch.bmm(gs.transpose(1, 2), xs)
        clock.lap("outer products")
        scatter_signed(out[lo : lo + step], main.view(gs.shape[0], -1), *comp._main, True)
        clock.lap("SJLT")
    if comp._bias:
        bias = g.sum(1)
        clock.lap("outer products")
        scatter_signed(out, bias, *comp._bias_col, overwrite=True)
        clock.lap("SJLT")
    return out


def index_batch(gc: GradientComputer, batch, clock: Clock, check: bool) -> dict[str, np.ndarray]:
    """One batch through the worker's steps; phi (B, k) per layer as host arrays."""
    with gc.capture.recording(), activation_gradients(gc.fused):  # as the computer runs it
        losses = gc.task.per_sample_loss(gc.model, batch)
    clock.lap("forward (with capture hooks)")
    factors = gc.capture.factors(losses)
    clock.lap("backward to layer outputs")
    phi = {}
    with torch.no_grad():
        for name, (x, g) in factors.items():
            phi[name] = compress_in_phases(gc.compressors[name], x, g, clock)
            if check and not torch.equal(phi[name], gc.compressors[name].compress(x, g)):
                raise AssertionError(f"phases differ from compress() for layer {name}")
            clock.last = time.process_time()  # the check is not part of the build
    host = {}
    for name, p in phi.items():
        if not all_finite(p):
            raise AssertionError(f"non-finite phi in layer {name}")
        host[name] = p.cpu().numpy()
    clock.lap("phi to host + finiteness check")
    return host


def references(gc: GradientComputer, batch, clock: Clock) -> None:
    """Forward without hooks, and a plain training step; timed, kept out of the shares."""
    gc.task.per_sample_loss(gc.model, batch)
    clock.lap("forward without hooks")
    gc.model.zero_grad(set_to_none=True)
    gc.task.per_sample_loss(gc.model, batch).sum().backward()
    clock.lap("plain fwd+bwd (training step)")


class TimedStore(Store):
    """A local Store whose puts are timed (write_shard's remaining time is serialisation)."""

    clock: Clock | None = None

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.clock.lap("serialisation (Parquet encode)")
        super().write_bytes(rel, data)
        self.clock.lap("write (local disk)")


def shard_cycle(gc, batches, store: TimedStore, dtype: str, cycle: int) -> dict[str, float]:
    """Index one shard of `batches`; CPU seconds per phase for the whole shard."""
    clock = Clock()
    store.clock = clock
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    for batch in batches:
        references(gc, batch, clock)
        for name, p in index_batch(gc, batch, clock, check=(cycle == 0)).items():
            parts[name].append(p)
    phi = {n: np.concatenate(p) for n, p in parts.items()}
    rows = len(next(iter(phi.values())))
    clock.last = time.process_time()
    keys = [str(r) for r in range(rows)]
    write_shard(store, f"shard-{cycle}.parquet", np.arange(rows), keys, phi, dtype=dtype)
    clock.lap("sha256 of the shard")  # write_shard hashes after its put
    return dict(clock.spent)


def workload(args) -> tuple:
    """(model, task, layer names, batches, tokens per row)."""
    if args.model == "mlp":
        model, task, layers = digits_mlp_shape(), ClassificationTask(), ["fc1", "fc2"]
        gen = torch.Generator().manual_seed(0)
        batches = [
            [torch.randn(args.batch, 64, generator=gen), torch.randint(0, 10, (args.batch,))]
            for _ in range(args.shard_batches)
        ]
        return model, task, layers, batches, 1
    model = gpt()
    batches = [token_batch(args.batch, 128, 4096, seed=i) for i in range(args.shard_batches)]
    return model, CausalLMTask(), linear_names(model, "blocks"), batches, 128


def table(args, spent: list[dict[str, float]], rows: int) -> list[str]:
    med = {p: statistics.median(s.get(p, 0.0) for s in spent) for p in PHASES + REFERENCE}
    total = sum(med[p] for p in PHASES)
    per_batch = 1e3 / args.shard_batches
    out = ["| phase | CPU ms / batch | share of the index build |", "|---|---|---|"]
    out += [f"| {p} | {med[p] * per_batch:.2f} | {100 * med[p] / total:.1f} % |" for p in PHASES]
    out.append(f"| **total index build** | {total * per_batch:.2f} | 100 % |")
    out += [f"| ({p}) | {med[p] * per_batch:.2f} | - |" for p in REFERENCE]
    plain = med[REFERENCE[1]]
    out += [
        "",
        f"Index build throughput: {rows / total:.1f} rows/s (CPU time) = "
        f"{plain / total:.3f} x a plain training forward + backward of the same batches "
        f"({rows / plain:.1f} rows/s). Capture hooks: forward with hooks - without = "
        f"{(med[PHASES[0]] - med[REFERENCE[0]]) * per_batch:.2f} ms / batch.",
    ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["gpt", "mlp"], default="gpt")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shard-batches", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, task, layers, batches, tokens = workload(args)
    comps = build_compressors(
        CompressionConfig(method="factgrass", k=args.k), resolve_layers(model, layers)
    )
    gc = GradientComputer(model, task, comps)
    with tempfile.TemporaryDirectory() as tmp:
        store = TimedStore(os.path.join(tmp, "index"))
        spent = [shard_cycle(gc, batches, store, args.dtype, c) for c in range(args.reps + 1)][1:]
    rows = args.batch * args.shard_batches
    command = "python bench/bench_breakdown.py " + " ".join(sys.argv[1:])
    lines = [
        f"# FactGraSS index build, phase by phase: {args.model}, k = {args.k} per layer, "
        f"{len(layers)} layers, batch {args.batch}" + (f" x {tokens} tokens" if tokens > 1 else ""),
        "",
        f"Command: `{command.strip()}`",
        "",
        machine_note(args.threads),
        "",
        f"A shard of {args.shard_batches} batches ({rows} rows, phi stored as {args.dtype}); "
        f"process CPU time per phase, median of {args.reps} shards after one warm-up shard.",
        "",
        *table(args, spent, rows),
    ]
    print("\n".join(lines))
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
