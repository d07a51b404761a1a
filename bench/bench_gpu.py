"""GPU index throughput: a Llama-shaped model of 1.1e9 parameters, bf16, random init.

    python bench/bench_gpu.py            # on a CUDA device (H200: well under 5 minutes)
    python bench/bench_gpu.py --tiny     # a tiny model on the CPU in seconds (tested)

Sequence 1024, batch 4 (`--batch`); the 112 Linear layers of the 16 blocks are attributed.
Tokens/s and peak device memory of, interleaved in one process:
- plain forward + backward (summed loss, `loss.backward()` with weight gradients: the limit);
- grass_dist FactGraSS (k = 4096 per layer, 128 x 128 masks) through
  `GradientComputer.phi_batch`;
- grass_dist LoGra (64 x 64 Gaussian projections, k = 4096) through the same path.
On a GPU, results go to bench/results/gpu.md; `--tiny` writes only where `--out` says.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.models import (  # noqa: E402
    LLAMA_1B,
    LLAMA_TINY,
    CausalLMTask,
    linear_names,
    llama,
    token_batch,
)
from bench.timing import write_result  # noqa: E402
from grass_dist.compress import build_compressors  # noqa: E402
from grass_dist.config import CompressionConfig  # noqa: E402
from grass_dist.gradients.capture import resolve_layers  # noqa: E402
from grass_dist.gradients.computer import GradientComputer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "gpu.md"
FULL = {"dims": LLAMA_1B, "seq": 1024, "batch": 4, "k": 4096, "mask": 128, "proj": 64}
TINY = {"dims": LLAMA_TINY, "seq": 32, "batch": 2, "k": 64, "mask": 16, "proj": 8}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, int]:
    """(seconds, peak bytes allocated during the call; 0 off CUDA) of one call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return seconds, peak


def competitors(model, task, batch, setup: dict, device: torch.device) -> dict:
    shapes = resolve_layers(model, linear_names(model, "layers"))
    fact = CompressionConfig(
        method="factgrass", k=setup["k"], mask_out=setup["mask"], mask_in=setup["mask"]
    )
    logra = CompressionConfig(
        method="logra", k=setup["proj"] ** 2, proj_out=setup["proj"], proj_in=setup["proj"]
    )
    gcs = {
        name: GradientComputer(model, task, build_compressors(cfg, shapes), device)
        for name, cfg in [("factgrass", fact), ("logra", logra)]
    }

    def plain():
        model.zero_grad(set_to_none=True)
        task.per_sample_loss(model, batch).sum().backward()

    def clear_then(fn):
        def run():
            model.zero_grad(set_to_none=True)  # the training step's grads are not ours to hold
            fn()

        return run

    return {
        "plain fwd+bwd": plain,
        "grass_dist factgrass": clear_then(lambda: gcs["factgrass"].phi_batch(batch)),
        "grass_dist logra": clear_then(lambda: gcs["logra"].phi_batch(batch)),
    }, len(shapes)


def measure(fns: dict, reps: int, device: torch.device) -> dict[str, tuple[float, int]]:
    """Median seconds and max peak bytes per competitor, interleaved after one warm-up."""
    for fn in fns.values():
        timed(fn, device)
    runs: dict[str, list[tuple[float, int]]] = {n: [] for n in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            runs[name].append(timed(fn, device))
    return {n: (statistics.median(s for s, _ in r), max(p for _, p in r)) for n, r in runs.items()}


def report(setup: dict, results: dict, device: torch.device, n_layers: int, n_params: int):
    tokens = setup["batch"] * setup["seq"]
    base = results["plain fwd+bwd"][0]
    logra = results["grass_dist logra"][0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"# GPU index throughput: Llama-shaped, {n_params:.3g} parameters, bf16, "
        f"sequence {setup['seq']}, batch {setup['batch']}, {n_layers} Linear layers",
        "",
        f"Device: {name}. Command: `python bench/bench_gpu.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"FactGraSS: k = {setup['k']} per layer, {setup['mask']} x {setup['mask']} masks; "
        f"LoGra: {setup['proj']} x {setup['proj']}. Medians of interleaved repetitions; peak "
        "memory is the most allocated during one call (weights included).",
        "",
        "| method | tokens/s | x plain fwd+bwd | x LoGra | peak memory GiB |",
        "|---|---|---|---|---|",
    ]
    for method, (seconds, peak) in results.items():
        lines.append(
            f"| {method} | {tokens / seconds:.0f} | {base / seconds:.3f} | "
            f"{logra / seconds:.3f} | {peak / 2**30:.2f} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (for --tiny)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per batch (default 4)")
    ap.add_argument("--out", default=None, help=f"results file (default on a GPU: {RESULTS})")
    args = ap.parse_args()
    setup = dict(TINY if args.tiny else FULL)
    if args.batch is not None:
        setup["batch"] = args.batch
    torch.set_num_threads(args.threads)
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run the tiny version with --tiny")
    model = llama(setup["dims"], torch.bfloat16, device)
    n_params = sum(p.numel() for p in model.parameters())
    task = CausalLMTask()
    batch = task.to(token_batch(setup["batch"], setup["seq"], setup["dims"]["vocab"]), device)
    fns, n_layers = competitors(model, task, batch, setup, device)
    lines = report(setup, measure(fns, args.reps, device), device, n_layers, n_params)
    print("\n".join(lines))
    out = args.out or (None if args.tiny else str(RESULTS))
    if out:
        write_result(out, lines)


if __name__ == "__main__":
    main()
