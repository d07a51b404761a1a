"""How soon the default job refuses bad input, as a user's shell runs it.

    .venv/bin/python bench/bench_refusals.py                 # 5 runs of each case
    .venv/bin/python bench/bench_refusals.py --repeats 9
    .venv/bin/python bench/bench_refusals.py --cases config placement --repeats 1

Each case is `python -m jobs.index` on the default digits job with one bad setting, into a
fresh store: a config value out of range, workers that the embedded Ray could never place,
a model factory given arguments it does not take, a training-set size the data cannot give,
and a store URL of an unknown protocol. The baseline is the same command composing its
config alone (`--cfg job`: Hydra prints it and exits), measured in the same run, case after
case: the floor of any refusal (the interpreter, the imports, the config). Every case must exit 2
with one `error:` paragraph and leave its store unwritten: the script raises otherwise.
`Ray up first` says whether the job's log shows its embedded Ray up before the refusal (a
refusal of the model, data or store comes while Ray starts beside those checks, and waits
for its start to stop it). Writes bench/results/refusals.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.timing import write_result  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "refusals.md"
RAY_UP = "started an embedded Ray"

# name -> (what is wrong, the overrides that make it so)
CASES = {
    "config": ("a config value out of range", ["compression.k=0"]),
    "placement": ("workers the embedded Ray could never place", ["cluster.cpus_per_worker=64"]),
    "model": (
        "a model factory given arguments it does not take",
        ["model._target_=grass_dist.data.digits"],
    ),  # fmt: skip
    "data": ("a training-set size the data cannot give", ["data.train.n_train=0"]),
    "store": ("a store URL of an unknown protocol", ["store.url=nosuch://bucket/index"]),
}


def run(overrides: list[str], work: Path, expect: int) -> tuple[float, str]:
    """`python -m jobs.index` with `overrides` into a fresh store under `work`: its wall
    time and stderr; raises unless it exits `expect` and, refused, left the store unwritten."""
    store = work / "index"
    shutil.rmtree(store, ignore_errors=True)
    out = work / "outputs"
    command = [
        sys.executable, "-m", "jobs.index", f"store.url={store}", f"run.output_dir={out}",
        f"hydra.run.dir={out}", *overrides,
    ]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    said = done.stderr.rstrip().splitlines()
    if done.returncode != expect or (expect == 2 and not said[-1:]):
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    if expect == 2 and (store.exists() or not any(s.startswith("error: ") for s in said)):
        raise SystemExit(f"{' '.join(overrides)}: no error paragraph, or the store was written")
    return wall, done.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_refusals_"))
    load = os.getloadavg()[0]
    base: list[float] = []
    walls: dict[str, list[float]] = {name: [] for name in args.cases}
    ray_up: dict[str, int] = dict.fromkeys(args.cases, 0)
    try:
        for r in range(args.repeats):
            base.append(run(["--cfg", "job"], work, 0)[0])
            for name in args.cases:
                wall, stderr = run(CASES[name][1], work, 2)
                walls[name].append(wall)
                ray_up[name] += RAY_UP in stderr
            print(f"run {r + 1}: baseline {base[-1]:.2f} s, " + ", ".join(
                f"{name} {walls[name][-1]:.2f} s" for name in args.cases), flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    floor = statistics.median(base)
    rows = [
        f"| {name} | {CASES[name][0]} | `{' '.join(CASES[name][1])}` | "
        f"{', '.join(f'{w:.1f}' for w in walls[name])} | {statistics.median(walls[name]):.2f} | "
        f"{statistics.median(walls[name]) / floor:.2f}x | {ray_up[name]} of {args.repeats} |"
        for name in args.cases
    ]
    command = "python bench/bench_refusals.py " + " ".join(sys.argv[1:])
    write_result(args.out, [
        "# How soon bad input is refused: `python -m jobs.index` on the default job",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {os.cpu_count()} cores; load average {load:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end. Every case exited 2 with an `error:` paragraph "
        "and left its store unwritten.",
        "",
        f"Baseline: the same command composing its config alone (`--cfg job`), wall "
        f"{', '.join(f'{b:.1f}' for b in base)} s, median {floor:.2f} s, measured between "
        "the cases of each run.",
        "",
        "| case | what is wrong | overrides | wall s (runs) | median | x baseline | Ray up first |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip


if __name__ == "__main__":
    main()
