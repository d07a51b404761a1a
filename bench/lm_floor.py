"""The floor under any per-example gradient tool on a causal LM: a bare forward and backward.

`--processes` P processes of `--threads` T threads each take every P-th document of the
corpus, batch them as grass_dist does (`--batch-tokens` per batch), and run the model's
forward with its loss and the backward down to the token embeddings, with every weight
frozen, so no weight gradient is formed: the work both grass_dist and bergson must do per
batch before any hook, projection or write. It prints {"loop_seconds": the slowest
process's loop, "batches": ...}.

bench/bench_vs_bergson.py runs it for each PxT layout next to the two tools: how close each
tool's gradient loop comes to the bare model.

    python bench/lm_floor.py --model DIR --corpus FILE --tokens 256 --batch-tokens 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def batches(ids: list[list[int]], batch_tokens: int) -> list[torch.Tensor]:
    """Equal-length rows, batch_tokens // length rows per batch (no padding needed)."""
    per = max(1, batch_tokens // len(ids[0]))
    return [torch.tensor(ids[lo : lo + per]) for lo in range(0, len(ids), per)]


def forward_backward(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """The loss's gradient down to the embeddings' output, every weight frozen."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds, labels=ids).loss.backward()


def one_part(args) -> dict:
    """The loop over this process's documents -> {"loop_seconds", "batches"}."""
    from transformers import GPT2LMHeadModel

    from bench.lm_workload import grass_dist_token_ids

    torch.set_num_threads(args.threads)
    ids = grass_dist_token_ids(Path(args.model), Path(args.corpus), args.tokens)
    model = GPT2LMHeadModel.from_pretrained(args.model, dtype=torch.float32).eval()
    model.requires_grad_(False)
    work = batches(ids[args.part :: args.processes], args.batch_tokens)
    t0 = time.perf_counter()
    for batch in work:
        forward_backward(model, batch)
    return {"loop_seconds": round(time.perf_counter() - t0, 3), "batches": len(work)}


def all_parts(args) -> dict:
    """`--processes` parts at once, each its own process -> the slowest loop, all batches."""
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *sys.argv[1:], "--part", str(i)], stdout=subprocess.PIPE
        )
        for i in range(args.processes)
    ]
    parts = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a part of the floor exited {proc.returncode}")
        parts.append(json.loads(out.decode().strip().splitlines()[-1]))
    return {
        "loop_seconds": max(p["loop_seconds"] for p in parts),
        "batches": sum(p["batches"] for p in parts),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a save_pretrained GPT-2 directory")
    ap.add_argument("--corpus", required=True, help="the benchmark's JSONL corpus")
    ap.add_argument("--tokens", type=int, required=True, help="tokens per document")
    ap.add_argument("--batch-tokens", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--part", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    print(json.dumps(one_part(args) if args.part is not None else all_parts(args)))


if __name__ == "__main__":
    main()
