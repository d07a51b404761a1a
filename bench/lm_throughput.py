"""Index throughput of a tiny GPT-2 on CPU: plain forward+backward vs FactGraSS.

Both run on the same rows of the Python documentation topics, in the same token-budget
batches, in the same process, interleaved; the table goes to bench/results/lm.md. Besides
wall time it records the process's CPU time, which other jobs on a shared machine disturb
far less (with one thread, CPU time is the compute time).

    .venv/bin/python bench/lm_throughput.py [--rows 128] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from grass_dist.compress import build_compressors
from grass_dist.config import CompressionConfig
from grass_dist.data.text import pydoc_topics
from grass_dist.gradients.capture import resolve_layers
from grass_dist.gradients.computer import GradientComputer
from grass_dist.models.hf import hf_causal_lm
from grass_dist.tasks.language_model import CausalLMTask

OUT = os.path.join(os.path.dirname(__file__), "results", "lm.md")


def tiny_gpt2() -> torch.nn.Module:
    """The example's architecture (4 layers, 128 wide, byte vocabulary), random weights."""
    config = {"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 512, "vocab_size": 257}
    config.update(bos_token_id=256, eos_token_id=256)
    return hf_causal_lm("gpt2", config, seed=0)


def plain_pass(model, task, batches) -> None:
    """Forward, summed loss, backward with every weight gradient (a training step's compute)."""
    model.train(False)
    for batch in batches:
        model.zero_grad(set_to_none=True)
        task.per_sample_loss(model, batch).sum().backward()


def factgrass_pass(computer, data, rows, batch_size) -> None:
    computer.phi_rows(data, rows, batch_size)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = pydoc_topics()  # the example's documents: <= 300 characters, <= 512 tokens
    rows = list(range(args.rows))
    items = [data[r] for r in rows]
    tokens = sum(len(it["input_ids"]) for it in items)
    task = CausalLMTask("sum", args.batch_tokens)
    batches = [task.collate([items[j] for j in g]) for g in task.plan_batches(items, 64)]
    model = tiny_gpt2()
    comps = build_compressors(CompressionConfig(k=args.k), resolve_layers(model, None))
    computer = GradientComputer(model, task, comps)

    runs = {
        "plain forward+backward (weight grads)": lambda: plain_pass(model, task, batches),
        f"FactGraSS k={args.k} per layer ({len(comps)} layers)": lambda: factgrass_pass(
            computer, data, rows, 64
        ),
    }
    for fn in runs.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so machine load hits both alike
        for name, fn in runs.items():
            w, c = timed(fn)
            wall[name].append(w)
            cpu[name].append(c)

    med = {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in runs}
    base = next(iter(med.values()))
    lines = [
        "# Index throughput: tiny GPT-2 on CPU",
        "",
        f"`.venv/bin/python bench/lm_throughput.py --rows {args.rows} --repeats {args.repeats} "
        f"--threads {args.threads}`",
        "",
        f"Model: GPT-2, 4 layers, 128 wide, vocabulary 257 (bytes), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, float32. "
        f"Data: the first {args.rows} pydoc_topics documents (<= 512 tokens), {tokens:,} "
        f"tokens, {len(batches)} token-budget batches of <= {args.batch_tokens} padded tokens. "
        f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end; medians of {args.repeats} "
        f"interleaved runs.",
        "",
        "| method | wall s | tokens/s (wall) | CPU s | tokens/s (CPU) | speed-up (CPU) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, (w, c) in med.items():
        lines.append(
            f"| {name} | {w:.2f} | {tokens / w:,.0f} | {c:.2f} | {tokens / c:,.0f} | "
            f"{base[1] / c:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
