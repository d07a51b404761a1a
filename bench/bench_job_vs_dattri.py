"""A whole attribution job, grass_dist against dattri 0.3.0's FactGraSSAttributor.

    .venv/bin/python bench/bench_job_vs_dattri.py                     # 10,000 rows, k = 4096
    .venv/bin/python bench/bench_job_vs_dattri.py --repeats 3
    .venv/bin/python bench/bench_job_vs_dattri.py --tiny              # seconds

What a user compares: one process from launch to exit that indexes the training rows,
builds the preconditioner and scores the queries against every training row.
- grass_dist: `python -m jobs.attribute` with the documented bring-your-own path
  (`model=custom data=custom`, the `_target_`s are `load_model` and `load_rows` of
  `bench/digits_payload.py`),
  FactGraSS at k per attributed layer (fc1 and fc2 of the digits MLP), the dense score
  matrix written (`scoring.dense=true`), damping delta, 2 workers of 1 CPU each;
- dattri: this script re-run in `.venv-dattri` (`bash bench/dattri_env.sh`): its
  FactGraSSAttributor (hessian eFIM, the same relative damping, proj_dim k) caches the
  training gradients, computes its preconditioners and inverse-Hessian-vector products and
  attributes the queries, on the same number of torch threads.
Both read one payload file (`bench/digits_payload.py`): the trained MLP's weights, `--rows`
training rows made from scikit-learn's digits, and the queries.
The two processes run in turn, `--repeats` times; each is reported by its best wall time.
dattri's CPU FactGraSS has a dense Gaussian second stage where grass_dist has an SJLT, so
the score matrices differ: the table reports their agreement (per-query Spearman, top-10
overlap), not equality. Writes bench/results/job_vs_dattri.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# torch only (and scikit-learn for the payload's rows): loads in .venv-dattri too
from bench.digits_payload import load_model, write_payload  # noqa: E402
from bench.timing import job_summary, write_result  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "job_vs_dattri.md"
DATTRI_PY = ROOT / ".venv-dattri" / "bin" / "python"
LAYERS = ["fc1", "fc2"]
EPOCHS = 5
TOP = 10  # proponents compared per query


# ---- the dattri side (runs in .venv-dattri) ---------------------------------------------


def _dattri_loss(model, batch, device):
    """dattri's convention: a batch-mean loss (it rescales by the batch size itself)."""
    inputs, targets = batch
    return torch.nn.functional.cross_entropy(model(inputs.to(device)), targets.to(device))


def dattri_job(payload: str, k: int, damping: float, scores: str, work: str) -> None:
    """Cache the training gradients, build the preconditioners, attribute the queries;
    save the (n_train, n_query) scores."""
    from dattri.algorithm import FactGraSSAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader

    model = load_model(payload)
    data = torch.load(payload, weights_only=True)
    # dattri 0.3.0 sizes its compressors from one example: items get a leading axis (1, 64).
    train_set = TensorDataset(data["train_x"][:, None, :], data["train_y"])
    query_set = TensorDataset(data["query_x"][:, None, :], data["query_y"])
    train_loader = DataLoader(train_set, batch_size=64)
    query_loader = DataLoader(query_set, batch_size=64)
    task = AttributionTask(loss_func=_dattri_loss, model=model, checkpoints=model.state_dict())
    attributor = FactGraSSAttributor(
        task=task,
        layer_names=LAYERS,
        device="cpu",
        hessian="eFIM",
        damping=damping,
        proj_dim=k,
        offload="cpu",
        cache_dir=work,
    )
    attributor.cache(train_loader)
    attributor.compute_preconditioners(damping=damping)
    attributor.compute_ifvp()
    out = attributor.attribute(train_loader, query_loader).detach().float().numpy()
    np.save(scores, out)


# ---- the driver (runs in .venv) -----------------------------------------------------------


def grass_dist_command(payload: Path, store: Path, outputs: Path, args) -> list[str]:
    """`python -m jobs.attribute` on the payload, as a user brings their own model and data."""
    here = "bench.digits_payload"
    return [
        sys.executable,
        "-m",
        "jobs.attribute",
        "model=custom",
        f"model._target_={here}.load_model",
        f"+model.path={payload}",
        "data=custom",
        f"data.train._target_={here}.load_rows",
        f"+data.train.path={payload}",
        "+data.train.split=train",
        f"data.query._target_={here}.load_rows",
        f"+data.query.path={payload}",
        "+data.query.split=query",
        "compression=factgrass",
        f"compression.k={args.k}",
        f"index.layers=[{','.join(LAYERS)}]",
        f"precondition.damping={args.damping}",
        "scoring.dense=true",
        f"scoring.self_influence={str(args.self_influence).lower()}",
        f"cluster.num_workers={args.threads}",
        f"cluster.num_cpus={args.threads}",
        f"store.url={store}",
        f"run.output_dir={outputs}",
    ]


def dattri_command(payload: Path, scores: Path, work: Path, args) -> list[str]:
    return [
        str(DATTRI_PY),
        __file__,
        "--side",
        "dattri",
        "--payload",
        str(payload),
        "--scores",
        str(scores),
        "--work",
        str(work),
        "--k",
        str(args.k),
        "--damping",
        str(args.damping),
        "--threads",
        str(args.threads),
    ]


def timed(command: list[str], threads: int) -> tuple[float, float, str]:
    """Run `command` from ROOT -> (wall s, CPU s of the processes it reaped, stdout).

    Raises with the process's stderr tail when it fails.
    """
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": str(threads),
        "TQDM_DISABLE": "1",
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[:4])} ... exited {done.returncode}:\n{done.stderr[-4000:]}"
        )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def grass_dist_scores(store: Path) -> np.ndarray:
    """The dense (n_train, n_query) scores of the job's result set `default`."""
    from grass_dist.index import GradientIndex
    from grass_dist.scoring.results import load_dense

    return load_dense(GradientIndex.open(str(store), {}), "default")


def agreement(a: np.ndarray, b: np.ndarray, top: int = TOP) -> dict[str, float]:
    """Per-query Spearman of two (n, Q) score matrices (mean, min) and the mean share of
    each query's `top` proponents they share."""
    from grass_dist.fidelity.metric import spearman_columns

    rho = spearman_columns(a, b)
    top_a = np.argsort(-a, axis=0)[:top]
    top_b = np.argsort(-b, axis=0)[:top]
    shared = [len(set(top_a[:, q]) & set(top_b[:, q])) / top for q in range(a.shape[1])]
    return {"spearman": float(rho.mean()), "spearman_min": float(rho.min()), "top": np.mean(shared)}


def dattri_available() -> tuple[bool, str]:
    if DATTRI_PY.exists():
        return True, f"dattri from {DATTRI_PY.relative_to(ROOT)}"
    return False, (
        "dattri not run: .venv-dattri does not exist. Install it with `bash bench/dattri_env.sh` "
        "(dattri 0.3.0 and the CPU torch wheel, from PyPI), then rerun."
    )


def run_both(args, work: Path, use_dattri: bool) -> dict:
    """Each side `args.repeats` times, in turn -> timings, the stage times of grass_dist's
    best run and the score agreement."""
    payload = work / "payload.pt"
    write_payload(payload, args.rows, args.queries, args.epochs)
    runs: dict[str, list[tuple[float, float]]] = {"grass_dist": [], "dattri": []}
    stages: list[dict] = []
    scores: dict[str, np.ndarray] = {}
    for rep in range(args.repeats):
        store = work / f"index-{rep}"
        cmd = grass_dist_command(payload, store, work / "outputs", args)
        wall, cpu, stdout = timed(cmd, args.threads)
        runs["grass_dist"].append((wall, cpu))
        stages.append(job_summary(stdout)["stage_seconds"])
        print(f"grass_dist run {rep}: {wall:.1f} s wall; stages {stages[-1]}", flush=True)
        scores["grass_dist"] = grass_dist_scores(store)
        shutil.rmtree(store)
        if use_dattri:
            out = work / "dattri_scores.npy"
            cache = work / f"dattri-{rep}"
            cache.mkdir()
            wall, cpu, _ = timed(dattri_command(payload, out, cache, args), args.threads)
            runs["dattri"].append((wall, cpu))
            print(f"dattri run {rep}: {wall:.1f} s wall", flush=True)
            scores["dattri"] = np.load(out)
            shutil.rmtree(cache)
    best = min(range(args.repeats), key=lambda r: runs["grass_dist"][r][0])
    agree = agreement(scores["grass_dist"], scores["dattri"]) if use_dattri else None
    return {"runs": runs, "stages": stages[best], "agreement": agree}


def table(args, result: dict, note: str) -> list[str]:
    command = "python bench/bench_job_vs_dattri.py " + " ".join(sys.argv[1:])
    runs = result["runs"]
    best = {name: min(r) for name, r in runs.items() if r}
    lines = [
        "# A whole job: grass_dist against dattri 0.3.0's FactGraSSAttributor",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"{args.rows} training rows, {args.queries} queries, FactGraSS k = {args.k} per layer "
        f"on {', '.join(LAYERS)} of the digits MLP (64-128-64-10), damping {args.damping}, "
        f"float32, {args.threads} threads a side; each side a whole process (launch to exit), "
        f"run in turn {args.repeats} time(s), best wall time. Cores: {os.cpu_count()}; load "
        f"average at start: {args.load:.1f}. {note}.",
        "",
        "grass_dist's job also writes the self-influence tau(i, i) of every training row (its "
        "default; dattri computes none): 2 n k^2 flops per layer, which is most of its `score` "
        "stage at this size."
        if args.self_influence
        else "grass_dist's job skips self-influence (`scoring.self_influence=false`), as "
        "dattri computes none.",
        "",
        "CPU s: user + system time of the processes the side's process reaped: all of dattri's "
        "work, but for grass_dist only a lower bound (Ray's worker and reducer processes are "
        "mostly not counted); compare wall times.",
        "",
        "| side | wall s (best) | wall s (all runs) | CPU s (best run) |",
        "|---|---|---|---|",
    ]
    for name, (wall, cpu) in best.items():
        every = ", ".join(f"{w:.1f}" for w, _ in runs[name])
        lines.append(f"| {name} | {wall:.1f} | {every} | {cpu:.1f} |")
    if "dattri" in best:
        ratio = best["dattri"][0] / best["grass_dist"][0]
        lines += ["", f"Ratio dattri / grass_dist (best wall): **{ratio:.2f}x**"]
    lines += [
        "",
        "grass_dist's stage times (its job summary's `stage_seconds`, best run):",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {stage} | {s:.2f} |" for stage, s in result["stages"].items()),
    ]
    agree = result["agreement"]
    if agree is not None:
        lines += [
            "",
            f"Score agreement ({args.rows} x {args.queries} matrices; dattri's CPU second stage "
            f"is a dense Gaussian, grass_dist's an SJLT, so they are not equal): per-query "
            f"Spearman mean {agree['spearman']:.3f} (min {agree['spearman_min']:.3f}); "
            f"top-{TOP} proponents shared: {agree['top']:.0%}.",
        ]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--k", type=int, default=4096, help="compressed size per layer")
    ap.add_argument("--damping", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs of the MLP")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--no-self-influence",
        dest="self_influence",
        action="store_false",
        help="grass_dist skips tau(i, i) of every training row (dattri computes none)",
    )
    ap.add_argument("--dattri", choices=["auto", "off"], default="auto")
    ap.add_argument("--tiny", action="store_true", help="512 rows, 4 queries, k = 64, 1 repeat")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--side", choices=["driver", "dattri"], default="driver", help=argparse.SUPPRESS
    )
    ap.add_argument("--payload", help=argparse.SUPPRESS)
    ap.add_argument("--scores", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side == "dattri":
        torch.set_num_threads(args.threads)
        dattri_job(args.payload, args.k, args.damping, args.scores, args.work)
        return 0
    if args.tiny:
        args.rows, args.queries, args.k, args.repeats, args.epochs = 512, 4, 64, 1, 1
    args.load = os.getloadavg()[0]
    use_dattri, note = dattri_available() if args.dattri == "auto" else (False, "dattri off")
    if not use_dattri:
        print(note, flush=True)
    with tempfile.TemporaryDirectory(prefix="job_vs_dattri-") as work:
        result = run_both(args, Path(work), use_dattri)
    lines = table(args, result, note)
    print("\n".join(lines))
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
