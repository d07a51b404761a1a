"""Reading results as README shows it: how long a user's process takes to read them.

    .venv/bin/python bench/bench_read_results.py              # 7 runs of each
    .venv/bin/python bench/bench_read_results.py --tiny       # seconds

Runs the default job with `scoring.dense=true` once, into a fresh index under `--workdir`,
then times README's two result reads ("Results: layout and schema": the top-k tables with
pandas, the dense matrix), each as written, as a whole process started from the folder that
holds `outputs/`. Against them, in the same run and interleaved: the same reads in a process
that imports torch first (what every read paid while reading an index imported torch), and
the floor, a process that imports only numpy, pyarrow.parquet and pandas. Reports each
one's median wall and CPU seconds (CPU of the child process). Writes
bench/results/read_results.md.
"""

from __future__ import annotations

import argparse
import os
import re
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

RESULTS = ROOT / "bench" / "results" / "read_results.md"
FLOOR = "import numpy, pandas, pyarrow.parquet"


def readme_reads() -> dict[str, str]:
    """README's result-reading snippets, as written: {'top-k': code, 'dense': code}."""
    text = (ROOT / "README.md").read_text().partition("## Results: layout and schema")[2]
    text = re.split(r"^## ", text, flags=re.M)[0]
    topk, dense = re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)
    return {"top-k": topk, "dense": dense}


def build(workdir: Path, tiny: bool) -> None:
    """The default job with dense scores, into workdir/outputs."""
    shutil.rmtree(workdir / "outputs", ignore_errors=True)
    sizes = ["data.train.n_train=200", "data.train.n_query=20"] if tiny else []
    done = subprocess.run(
        [sys.executable, "-m", "jobs.attribute", "scoring.dense=true", *sizes],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise SystemExit(f"the job failed:\n{done.stderr[-3000:]}")


def run_once(code: str, cwd: Path) -> tuple[float, float]:
    """(wall seconds, the child's CPU seconds) of `python -c code` from `cwd`."""
    before = os.times()
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    wall = time.perf_counter() - start
    after = os.times()
    if done.returncode != 0:
        raise SystemExit(f"a read failed ({done.returncode}):\n{code}\n{done.stderr[-3000:]}")
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tiny", action="store_true", help="200 training rows, 1 run each")
    p.add_argument("--workdir", default=None, help="default: a temporary folder")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    repeats = 1 if args.tiny else args.repeats
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gd-read-"))
    workdir.mkdir(parents=True, exist_ok=True)
    note = f"cores: {os.cpu_count()}; load average at start: {os.getloadavg()[0]:.1f}"
    build(workdir, args.tiny)

    cases = {"floor (numpy, pandas, pyarrow imported)": FLOOR}
    for name, code in readme_reads().items():
        cases[f"README's {name} read"] = code
        cases[f"README's {name} read, torch imported first"] = "import torch\n" + code
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for code in cases.values() if not args.tiny else ():  # warm the page cache, uncounted
        run_once(code, workdir)
    for _ in range(repeats):
        for name, code in cases.items():
            runs[name].append(run_once(code, workdir))

    def median(name: str, i: int) -> float:
        return statistics.median(r[i] for r in runs[name])

    lines = [
        "# Reading results as README shows it, as a process",
        "",
        f"Command: `python bench/bench_read_results.py{' --tiny' if args.tiny else ''}"
        f" --repeats {repeats}`",
        "",
        f"Machine: {note} (a shared machine). Results of "
        f"`python -m jobs.attribute scoring.dense=true`"
        f"{' (200 training rows)' if args.tiny else ''}; each case a whole process from "
        f"the folder holding `outputs/`, the cases in turn, medians of {repeats} run(s).",
        "",
        "| case | wall s (runs) | median wall s | median CPU s |",
        "|---|---|---|---|",
    ]
    for name in cases:
        walls = ", ".join(f"{w:.2f}" for w, _ in runs[name])
        lines.append(f"| {name} | {walls} | {median(name, 0):.2f} | {median(name, 1):.2f} |")
    lines += ["", "| read | as it is, against torch imported first (wall) |", "|---|---|"]
    for name in readme_reads():
        ours, theirs = (
            median(f"README's {name} read", 0),
            median(f"README's {name} read, torch imported first", 0),
        )
        lines.append(f"| {name} | {theirs / ours:.2f}x ({ours:.2f} s vs {theirs:.2f} s) |")
    write_result(args.out, lines)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
