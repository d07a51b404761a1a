"""Whole-process index build: grass_dist (`python -m jobs.index`) vs bergson 2.5.1 (`build`).

Both tools run as subprocesses, timed from launch to exit, on the same work:

- model: a GPT-2 (transformers GPT2LMHeadModel) with seeded random weights, saved with
  `save_pretrained`, next to a byte-level BPE tokenizer trained offline on
  `pydoc_data.topics` (a `PreTrainedTokenizerFast`); both tools load the directory;
- data: one JSONL of `--docs` documents of exactly `--tokens` tokens (the start token
  included), each a string of words that are single tokens of that tokenizer, so both
  tools' tokenizations are checked equal token by token before anything is timed;
- modules: the 4 projections of each block (attn.c_attn, attn.c_proj, mlp.c_fc,
  mlp.c_proj); neither tool attributes the (tied) LM head;
- size: 256 per module (bergson projection_dim=16 gives 16 x 16; grass_dist FactGraSS k=256);
- float32 model and gradients, `--batch-tokens` padded tokens per batch on both sides;
- layouts PxT: P processes of T threads (grass_dist P workers x T CPUs; bergson one process,
  or its own launcher's P processes). OMP_NUM_THREADS=T is set for both: grass_dist's
  workers call torch.set_num_threads(cpus_per_worker), bergson's launcher keeps torch's
  default when OMP_NUM_THREADS is set.

Runs alternate (grass_dist, bergson, the bare model's floor of bench/lm_floor.py,
grass_dist, ...) and the table reports the best of `--repeats`. Each run writes a fresh
index (grass_dist store, bergson run dir) and uses a fresh datasets cache, so no run reuses
another's work.

    python bench/bench_vs_bergson.py                          # 2000 x 256 tokens, 1x2 and 2x1
    python bench/bench_vs_bergson.py --docs 200 --layouts 1x2 --repeats 1
    python bench/bench_vs_bergson.py --tiny --repeats 1 --out /tmp/vs.md

bergson runs from `.venv-bergson` (made by `bash bench/bergson_env.sh`); without it only
grass_dist runs and the table says how to install bergson.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.lm_workload import N_POSITIONS, Size, build_workload, checked_token_ids  # noqa: E402
from bench.timing import TreeCPU  # noqa: E402
from bench.vs_bergson_sides import (  # noqa: E402
    BERGSON_PY,
    BLOCK_MODULES,
    PER_MODULE,
    Layout,
    bergson_command,
    bergson_stages,
    check_bergson,
    check_grass_dist,
    check_same_tokens,
    floor_command,
    floor_stages,
    grass_dist_command,
    grass_dist_stages,
    grass_dist_summary,
)

RESULTS = ROOT / "bench" / "results" / "vs_bergson.md"


def run_env(layout: Layout, run: Path) -> dict:
    """Environment of one run: T threads for every math library, nothing from the network,
    a datasets cache of this run's own."""
    env = dict(os.environ)
    threads = str(layout.threads)
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        PYTHONPATH=str(ROOT),
        HF_HOME=str(run / "hf"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",
    )
    return env


def timed(command: list[str], env: dict, log: Path) -> tuple[float, float]:
    """(wall seconds from launch to exit, CPU seconds of its process tree); the output goes
    to `log`; a failure stops the benchmark."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        tree = TreeCPU(proc.pid)
        code = proc.wait()
        wall = time.perf_counter() - t0
        cpu = tree.stop()
    if code != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(command[:4])} ... exited {code}; {log}:\n{tail}")
    return wall, cpu


# ---------------------------------------------------------------- measuring and the table


@dataclass
class Result:
    tool: str
    layout: Layout
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    stages: dict[str, float] | None = None  # where the best run's time went


def record(result: Result, wall: float, cpu: float, stages: dict[str, float]) -> None:
    """Add one run; its stages are kept when it is the fastest so far."""
    if not result.walls or wall < min(result.walls):
        result.stages = stages
    result.walls.append(wall)
    result.cpus.append(cpu)
    print(
        f"{result.layout} {result.tool} run {len(result.walls)}: {wall:.1f} s wall, "
        f"{cpu:.1f} s CPU",
        flush=True,
    )


def measure(
    args, size: Size, model_dir: Path, corpus: Path, with_bergson: bool, done: Callable
) -> None:
    """Interleaved runs of each tool per layout; fresh output directories every time.
    `done(results so far)` runs after each layout (a long benchmark keeps what it measured)."""
    results = []
    for layout in args.layouts:
        ours = Result("grass_dist", layout)
        theirs = Result("bergson", layout)
        floor = Result("floor", layout)
        for rep in range(args.repeats):
            run = args.workdir / f"runs/{layout}/grass_dist-{rep}"
            shutil.rmtree(run, ignore_errors=True)
            command = grass_dist_command(size, layout, args.batch_tokens, model_dir, corpus, run)
            wall, cpu = timed(command, run_env(layout, run), run / "log.txt")
            summary = grass_dist_summary(run / "log.txt")
            check_grass_dist(summary, size)
            record(ours, wall, cpu, grass_dist_stages(summary, wall))
            if with_bergson:
                run = args.workdir / f"runs/{layout}/bergson-{rep}"
                shutil.rmtree(run, ignore_errors=True)
                command = bergson_command(layout, args.batch_tokens, model_dir, corpus, run)
                wall, cpu = timed(command, run_env(layout, run), run / "log.txt")
                check_bergson(run, size)
                record(theirs, wall, cpu, bergson_stages(run / "log.txt", wall))
            log = args.workdir / f"runs/{layout}/floor-{rep}.txt"
            command = floor_command(size, layout, args.batch_tokens, model_dir, corpus)
            wall, cpu = timed(command, run_env(layout, args.workdir), log)
            record(floor, wall, cpu, floor_stages(log, wall))
        results += [ours, theirs, floor] if with_bergson else [ours, floor]
        done(results)


def versions(with_bergson: bool) -> str:
    """grass_dist's interpreter and packages, and bergson's (or how to install it)."""
    ours = (
        f"grass_dist {importlib.metadata.version('grass_dist')} ({sys.executable}; torch "
        f"{torch.__version__}, transformers {importlib.metadata.version('transformers')}, "
        f"ray {importlib.metadata.version('ray')})"
    )
    if not with_bergson:
        return f"{ours}; bergson not run: no {BERGSON_PY} (install it: `bash bench/bergson_env.sh`)"
    probe = (
        "import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
        "('bergson', 'torch', 'transformers', 'datasets')))"
    )
    theirs = subprocess.run(
        [str(BERGSON_PY), "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    return f"{ours}; {theirs} ({os.path.relpath(BERGSON_PY, ROOT)})"


def table(args, size: Size, results: list[Result], with_bergson: bool, load: float) -> str:
    """The results file: command, machine, versions, then one row per tool and layout."""
    tokens = size.docs * size.tokens
    command = "python bench/bench_vs_bergson.py " + " ".join(sys.argv[1:])
    lines = [
        "# Whole-process index build: grass_dist vs bergson 2.5.1",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}; load average at start {load:.1f}, at end "
        f"{os.getloadavg()[0]:.1f} (a shared machine: runs interleaved, best of "
        f"{args.repeats}).",
        "",
        f"Versions: {versions(with_bergson)}",
        "",
        f"Work: GPT-2 ({size.blocks} blocks, width {size.width}, {size.heads} heads, vocabulary "
        f"{size.vocab} byte-level BPE, random weights, float32); {size.docs} documents x "
        f"{size.tokens} tokens = {tokens} tokens, identical token ids on both sides (checked); "
        f"{size.blocks * len(BLOCK_MODULES)} modules (attn.c_attn, attn.c_proj, mlp.c_fc, "
        f"mlp.c_proj), {PER_MODULE} per module (grass_dist FactGraSS k={PER_MODULE}, "
        f"bias included; bergson projection_dim={int(PER_MODULE**0.5)}, no bias); "
        f"{args.batch_tokens} padded tokens per batch. Wall seconds from launch to exit "
        "(start-up, model load, tokenisation and writing included); CPU seconds of the whole "
        "process tree (Ray's daemons and workers, bergson's ranks; sampled from /proc every "
        "0.5 s), which a loaded machine inflates less than wall time.",
        "",
        "`x` = the row's seconds / grass_dist's (above 1: grass_dist faster), of the best "
        "wall and of the least CPU time. Where the "
        "best run's time went: for grass_dist the `stage_seconds` of its job summary, the rest "
        "of its `total_seconds` (job setup+shutdown) and the wall time outside the job "
        "(interpreter, imports, Hydra, exit); for bergson its gradient loop's progress-bar time "
        "(whole seconds, slowest rank) and the rest. `floor`: bench/lm_floor.py, the bare "
        "model's forward (with its loss) and backward to the embeddings on the same batches, "
        "every weight frozen, in the same layout: the work any such tool does per batch "
        "before hooks, projections and writes; its loop is what a tool's gradient loop "
        "(grass_dist's `index`, bergson's tqdm time) compares with.",
        "",
        "| layout (procs x threads) | tool | wall s (best) | wall s (runs) | tokens/s (wall) | "
        "x (wall) | CPU s (least) | x (CPU) | where the best wall run went (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_layout = {}
    for r in results:
        by_layout.setdefault(str(r.layout), {})[r.tool] = r
    for layout, tools in by_layout.items():
        ours = tools["grass_dist"]
        for tool, r in tools.items():
            wall, cpu = min(r.walls), min(r.cpus)
            runs = ", ".join(f"{w:.1f}" for w in r.walls)
            stages = ", ".join(f"{k} {v:.1f}" for k, v in (r.stages or {}).items()) or "-"
            lines.append(
                f"| {layout} | {tool} | {wall:.1f} | {runs} | {tokens / wall:,.0f} | "
                f"{wall / min(ours.walls):.2f} | {cpu:.1f} | {cpu / min(ours.cpus):.2f} | "
                f"{stages} |"
            )
    if not with_bergson:
        lines += ["", "bergson not run: install it with `bash bench/bergson_env.sh`."]
    return "\n".join(lines) + "\n"


def parse_args() -> tuple[argparse.Namespace, Size]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument(
        "--tokens", type=int, default=256, help="tokens per document (start token included)"
    )
    ap.add_argument("--layouts", nargs="+", default=["1x2", "2x1"], help="PROCESSESxTHREADS")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=512, help="padded tokens per batch")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--tiny", action="store_true", help="2 blocks of width 64, 8 documents of 32 tokens"
    )
    args = ap.parse_args()
    if args.tiny:
        size = Size(docs=8, tokens=32, blocks=2, width=64, heads=2, vocab=1024)
        args.batch_tokens = min(args.batch_tokens, 64)
    else:
        size = Size(args.docs, args.tokens, blocks=4, width=256, heads=4, vocab=args.vocab)
    args.layouts = [Layout.parse(x) for x in args.layouts]
    if size.tokens < 2 or size.docs < 1:
        raise SystemExit("--tokens must be >= 2 and --docs >= 1")
    if args.batch_tokens < size.tokens or args.batch_tokens > N_POSITIONS:
        raise SystemExit(
            f"--batch-tokens {args.batch_tokens} must hold one document ({size.tokens} tokens) "
            f"and stay within the model's context ({N_POSITIONS}); bergson refuses either"
        )
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    return args, size


def main() -> None:
    args, size = parse_args()
    load = os.getloadavg()[0]
    with_bergson = BERGSON_PY.exists()
    own_workdir = args.workdir is None
    if own_workdir:
        import tempfile

        args.workdir = Path(tempfile.mkdtemp(prefix="vs_bergson-"))
    args.workdir = args.workdir.resolve()
    try:
        model_dir, corpus = build_workload(size, args.workdir)
        if with_bergson:
            check_same_tokens(model_dir, corpus, size, run_env(Layout(1, 1), args.workdir))
        else:
            checked_token_ids(model_dir, corpus, size)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write = lambda results: args.out.write_text(table(args, size, results, with_bergson, load))
        measure(args, size, model_dir, corpus, with_bergson, write)
    finally:
        if own_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
