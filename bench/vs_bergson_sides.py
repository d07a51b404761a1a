"""The three sides of bench/bench_vs_bergson.py: each one's command (grass_dist's
`jobs.index`, bergson's `build`, the bare model's floor of bench/lm_floor.py), how its log
says where its time went, and the checks that each did the same work (tokens, modules, rows).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.lm_workload import Size, checked_token_ids
from bench.timing import job_summary

ROOT = Path(__file__).resolve().parents[1]
BERGSON_PY = ROOT / ".venv-bergson" / "bin" / "python"
BLOCK_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
PER_MODULE = 256  # bergson projection_dim 16 -> 16 x 16; grass_dist compression.k


@dataclass(frozen=True)
class Layout:
    """P processes of T torch threads each."""

    processes: int
    threads: int

    @classmethod
    def parse(cls, text: str) -> Layout:
        try:
            p, t = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise SystemExit(
                f"--layouts {text!r}: write PROCESSESxTHREADS, e.g. 1x2 or 2x1"
            ) from None
        if p < 1 or t < 1:
            raise SystemExit(f"--layouts {text!r}: processes and threads must be >= 1")
        return cls(p, t)

    def __str__(self) -> str:
        return f"{self.processes}x{self.threads}"


BERGSON_TOKENIZE = """
import json, sys
from datasets import load_dataset
from transformers import AutoTokenizer
from bergson.config.config import DataConfig
from bergson.data import tokenize
corpus, model_dir = sys.argv[1:3]
ds = load_dataset("json", data_files=corpus, split="train")
tokenizer = AutoTokenizer.from_pretrained(model_dir)
out = tokenize(ds[:], args=DataConfig(), tokenizer=tokenizer)
print(json.dumps(out["input_ids"]))
"""


def check_same_tokens(model_dir: Path, corpus: Path, size: Size, env: dict) -> None:
    """bergson's own tokenize() of the corpus must equal grass_dist's rows, token by token."""
    ours = checked_token_ids(model_dir, corpus, size)
    done = subprocess.run(
        [str(BERGSON_PY), "-c", BERGSON_TOKENIZE, str(corpus), str(model_dir)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"bergson's tokenize() failed:\n{done.stderr[-3000:]}")
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    if theirs != ours:
        differ = sum(a != b for a, b in zip(ours, theirs, strict=False))
        raise SystemExit(
            f"the tools tokenize the corpus differently ({differ} documents differ, "
            f"{len(ours)} vs {len(theirs)} rows); the comparison would not be of the same work"
        )


# ---------------------------------------------------------------- the three commands


def module_names(size: Size) -> list[str]:
    """The 4 projections of every block, as named in GPT2LMHeadModel (bergson hooks the same
    modules of its `base_model`, `transformer`, so its names lack the prefix)."""
    return [f"transformer.h.{b}.{m}" for b in range(size.blocks) for m in BLOCK_MODULES]


def grass_dist_command(
    size: Size, layout: Layout, batch_tokens: int, model_dir: Path, corpus: Path, run: Path
) -> list[str]:
    """`python -m jobs.index` with the documented text_files path, FactGraSS k=256."""
    layers = ",".join(module_names(size))
    return [
        sys.executable,
        "-m",
        "jobs.index",
        "model=hf_causal_lm",
        f"model.pretrained={model_dir}",
        "model.dtype=float32",
        "data=text_files",
        f"data.train.paths=[{corpus}]",
        f"data.train.tokenizer={model_dir}",
        f"data.train.max_length={size.tokens}",
        "data.train.key_field=id",
        "task=causal_lm",
        f"task.batch_tokens={batch_tokens}",
        "compression=factgrass",
        f"compression.k={PER_MODULE}",
        f"index.layers=[{layers}]",
        "index.dtype=float32",
        f"cluster.num_workers={layout.processes}",
        f"cluster.cpus_per_worker={layout.threads}",
        f"cluster.num_cpus={layout.processes * layout.threads}",
        f"store.url={run / 'index'}",
        f"run.output_dir={run / 'outputs'}",
    ]


def bergson_command(
    layout: Layout, batch_tokens: int, model_dir: Path, corpus: Path, run: Path
) -> list[str]:
    """`bergson build` (its CLI and launcher), projection_dim 16 per module."""
    return [
        str(BERGSON_PY),
        "-m",
        "bergson",
        "build",
        str(run / "index"),
        "--model",
        str(model_dir),
        "--dataset",
        str(corpus),
        "--precision",
        "fp32",
        "--projection_dim",
        str(int(PER_MODULE**0.5)),
        "--token_batch_size",
        str(batch_tokens),
        "--nproc_per_node",
        str(layout.processes),
    ]


def floor_command(
    size: Size, layout: Layout, batch_tokens: int, model_dir: Path, corpus: Path
) -> list[str]:
    """bench/lm_floor.py: the bare forward + backward of the same batches, same layout."""
    return [
        sys.executable,
        str(ROOT / "bench" / "lm_floor.py"),
        f"--model={model_dir}",
        f"--corpus={corpus}",
        f"--tokens={size.tokens}",
        f"--batch-tokens={batch_tokens}",
        f"--threads={layout.threads}",
        f"--processes={layout.processes}",
    ]


def floor_stages(log: Path, wall: float) -> dict[str, float]:
    """Where a floor run's time went: its slowest process's loop, and the rest."""
    loop = json.loads(log.read_text().strip().splitlines()[-1])["loop_seconds"]
    return {"forward+backward loop": loop, "rest": wall - loop}


def grass_dist_summary(log: Path) -> dict:
    """The job summary jobs.index prints last (a JSON object at the end of its output)."""
    return job_summary(log.read_text())


def grass_dist_stages(summary: dict, wall: float) -> dict[str, float]:
    """Where grass_dist's wall time went: its stages, the rest of the job (config, model and
    data load, index creation, shutdown) and what lies outside the job (interpreter start,
    imports, Hydra, exit)."""
    stages = dict(summary["stage_seconds"])
    job = summary["total_seconds"]
    return {
        "outside job": wall - job,
        "job setup+shutdown": job - sum(stages.values()),
        **stages,
    }


COLLECT_BAR = re.compile(
    r"Collecting gradients: 100%\|[^|\r\n]*\| (\d+)/\1 \[(?:(\d+):)?(\d+):(\d+)<"
)


def bergson_stages(log: Path, wall: float) -> dict[str, float]:
    """bergson's gradient loop (its progress bar's elapsed time, whole seconds; the slowest
    rank) and everything else (start-up, model and data load, tokenisation, writing)."""
    loops = [
        int(h or 0) * 3600 + int(m) * 60 + int(sec)
        for _, h, m, sec in COLLECT_BAR.findall(log.read_text())
    ]
    if not loops:
        return {}
    return {"gradient loop (tqdm)": float(max(loops)), "rest": wall - max(loops)}


def check_grass_dist(summary: dict, size: Size) -> None:
    """grass_dist's own count: every document a row of the index."""
    rows = summary["index"]["rows"]
    if rows != size.docs:
        raise SystemExit(f"grass_dist indexed {rows} rows, expected {size.docs}")


TRACKED = re.compile(r"Tracking \d+ modules: (\[[^\]]*\])")


def check_bergson(run: Path, size: Size) -> None:
    """bergson's own counts: the modules it tracked, `num_items` rows and `total_processed`
    gradient-carrying positions (every token but each document's last)."""
    index = run / "index"
    tracked = TRACKED.search((run / "log.txt").read_text())
    expected_modules = [name.removeprefix("transformer.") for name in module_names(size)]
    if tracked is None or sorted(ast.literal_eval(tracked[1])) != sorted(expected_modules):
        found = tracked[1] if tracked else "no 'Tracking ... modules' line"
        raise SystemExit(f"bergson tracked {found}; expected {expected_modules}")
    items = json.loads((index / "info.json").read_text())["num_items"]
    positions = int(torch.load(index / "total_processed.pt"))
    expected = size.docs * (size.tokens - 1)
    if items != size.docs or positions != expected:
        raise SystemExit(
            f"bergson indexed {items} rows and {positions} positions; expected {size.docs} "
            f"rows and {expected} positions ({size.docs} x ({size.tokens} - 1))"
        )
