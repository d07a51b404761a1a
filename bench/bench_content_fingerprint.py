"""Cost of content fingerprints: index rows/s with and without row digests, and the resume check.

    .venv/bin/python bench/bench_content_fingerprint.py             # GPT shape + digits MLP
    .venv/bin/python bench/bench_content_fingerprint.py --models gpt --reps 3

One shard of training rows through a worker's code path, one process, interleaved (see
`timing.py`):
- `with digests`: `GradientComputer.load_rows` (read, digest, collate), `phi_loaded`,
  `GradientIndex.write_shard` with the digests (the `row_sha256` column and the record's
  `data_sha256`), as `GradientWorker.index_shard` runs them;
- `without digests`: the same read, collate, compute and write, with no digest and no column;
- `digests alone`: `row_digests` of the shard's items (the added work, timed by itself:
  end-to-end differences of a fraction of a percent are below the machine's noise).
Then the resume check: `check_committed_content` over an index of `--check-rows` committed
rows of the same items (phi zeros: the check reads no gradients), in rows/s.
Models as in `bench_index_throughput.py`: the GPT shape (4 blocks, width 512, sequence 128,
its 24 block Linear layers, FactGraSS k=1024) and the digits MLP (fc1, fc2).
Writes bench/results/content_fingerprint.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.models import CausalLMTask, digits_mlp_shape, gpt, linear_names  # noqa: E402
from bench.timing import interleaved, machine_note, write_result  # noqa: E402
from grass_dist.compress import build_compressors  # noqa: E402
from grass_dist.config import CompressionConfig  # noqa: E402
from grass_dist.data.identity import check_committed_content  # noqa: E402
from grass_dist.gradients.capture import resolve_layers  # noqa: E402
from grass_dist.gradients.computer import GradientComputer, LoadedRows  # noqa: E402
from grass_dist.index import GradientIndex  # noqa: E402
from grass_dist.index.content import row_digests  # noqa: E402
from grass_dist.tasks.classifier import ClassificationTask  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "content_fingerprint.md"
NOTES = (
    "The GPT shape is the regime the 3 % budget is set for. The digits MLP is the cheap "
    "extreme: it computes little per row, so the digest's fixed cost per row (one sha256 "
    "and a few small numpy views, in Python) is a visible share of its index time. In a "
    "worker the digests are part of the load phase, which runs outside the compute slot and "
    "overlaps another shard's compute (cluster.max_inflight_per_worker=2 by default; see "
    "grass_dist/runtime/overlap.py) when the worker has a spare core."
)


class TokenTask(CausalLMTask):
    """The benchmark's causal-LM task over (inputs (T,), targets (T,)) items."""

    def collate(self, items: list) -> list[torch.Tensor]:
        return [torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])]


class Rows:
    """``n`` random items of the workload's shape, keyed ``r<i>``."""

    def __init__(self, model: str, n: int):
        gen = torch.Generator().manual_seed(0)
        if model == "gpt":
            ids = torch.randint(0, 4096, (n, 129), generator=gen)
            self.items = [(row[:-1].clone(), row[1:].clone()) for row in ids]
        else:
            x, y = torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)
            self.items = list(zip(x, y, strict=True))
        self.keys = [f"r{i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def workload(name: str, k: int) -> tuple[GradientComputer, int, int]:
    """(computer, rows per shard, batch size) as an index worker would hold them."""
    if name == "gpt":
        model, task, shard, batch = gpt(), TokenTask(), 16, 8
        layers = linear_names(model, "blocks")
    else:
        model, task, shard, batch = digits_mlp_shape(), ClassificationTask(), 512, 64
        layers = ["fc1", "fc2"]
    shapes = resolve_layers(model, layers)
    comps = build_compressors(CompressionConfig(method="factgrass", k=k), shapes)
    return GradientComputer(model, task, comps), shard, batch


def shard_timings(computer: GradientComputer, data: Rows, shard: int, batch: int, index, reps):
    """Interleaved timings of one shard with digests, without them, and the digests alone."""
    rows = range(shard)

    def with_digests():
        loaded = computer.load_rows(data, rows, batch)
        block = computer.phi_loaded(loaded)
        index.write_shard("s", 0, shard, block.row_ids, block.keys, block.phi, loaded.digests)

    def without_digests():
        items = [data[r] for r in rows]
        groups = [list(range(s, min(s + batch, shard))) for s in range(0, shard, batch)]
        loaded = LoadedRows(
            row_ids=np.arange(shard, dtype=np.int64),
            keys=[data.keys[r] for r in rows],
            digests=np.zeros((0, 32), np.uint8),  # not computed, not written
            batches=[(g, computer.task.collate([items[j] for j in g])) for g in groups],
        )
        block = computer.phi_loaded(loaded)
        index.write_shard("s", 0, shard, block.row_ids, block.keys, block.phi)

    return interleaved(
        {
            "with digests": with_digests,
            "without digests": without_digests,
            "digests alone": lambda: row_digests(data[r] for r in rows),
        },
        reps,
    )


def resume_check(url: str, data: Rows, n: int, shard: int = 512) -> tuple[float, float]:
    """(CPU s, wall s) of `check_committed_content` over an index of `n` committed rows of
    `data` (one 1-wide layer of zeros: the check reads no gradients)."""
    index = GradientIndex.create_or_open(url, {"layers": [{"name": "phi", "k": 1}]})
    records = []
    for lo in range(0, n, shard):
        ids = np.arange(lo, min(lo + shard, n))
        digests = row_digests(data[int(r)] for r in ids)
        keys = [data.keys[r] for r in ids]
        phi = {"phi": np.zeros((len(ids), 1), np.float32)}
        records.append(index.write_shard(f"s{lo:09d}", lo, ids[-1] + 1, ids, keys, phi, digests))
    index.commit(records)
    c0, w0 = time.process_time(), time.perf_counter()
    check_committed_content(index, data)
    return time.process_time() - c0, time.perf_counter() - w0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["gpt", "mlp"], choices=["gpt", "mlp"])
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--check-rows", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = "python bench/bench_content_fingerprint.py " + " ".join(sys.argv[1:])
    lines = [
        "# Content fingerprints: index throughput with and without row digests",
        "",
        f"Command: `{command.strip()}`",
        "",
        machine_note(args.threads),
        "",
        "One shard through a worker's code path (read, digest, collate, FactGraSS "
        f"k={args.k}, Parquet write to local disk), competitors interleaved, medians of "
        f"{args.reps} repetitions of process CPU time (one torch thread). `overhead` = "
        "`digests alone` / `without digests`: the added work as a share of index time (the "
        "end-to-end difference of the first two rows is the same work plus the machine's "
        "noise). `resume check` = `check_committed_content` over "
        f"{args.check_rows} committed rows (shards of 512); `x index time` = its time per "
        "row / the index's time per row without digests.",
        "",
        NOTES,
        "",
        "| model | rows/shard | batch | measurement | rows/s (CPU) | rows/s (wall) | overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            computer, shard, batch = workload(name, args.k)
            n = args.check_rows
            data = Rows(name, max(shard, n))
            layers = [{"name": m, "k": c.out_dim} for m, c in computer.compressors.items()]
            index = GradientIndex.create_or_open(f"{tmp}/{name}", {"layers": layers})
            timings = shard_timings(computer, data, shard, batch, index, args.reps)
            base = timings["without digests"]
            out = []
            for label, t in timings.items():
                share = f"{t.cpu_s / base.cpu_s:.3%}" if label == "digests alone" else "-"
                out.append(
                    f"| {name} | {shard} | {batch} | {label} | {shard / t.cpu_s:.1f} | "
                    f"{shard / t.wall_s:.1f} | {share} |"
                )
            cpu, wall = resume_check(f"{tmp}/{name}-check", data, n)
            ratio = (cpu / n) / (base.cpu_s / shard)
            out.append(
                f"| {name} | {shard} | {batch} | resume check ({n} rows) | {n / cpu:.0f} | "
                f"{n / wall:.0f} | x index time {ratio:.4f} |"
            )
            print("\n".join(out), flush=True)
            lines += out
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
