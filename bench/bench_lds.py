"""LDS of every compressor on the digits MLP, the exact ceiling, and a digits CNN end to end.

    python bench/bench_lds.py [--n-train 1000 --n-query 200 --subsets 50 --seeds 3
                               --ks 256 1024 4096 --out outputs/bench_lds]

One run does everything:
1. LDS ground truth (jobs.lds's code): `subsets` random halves x `seeds` retrainings of the
   digits MLP (the model builder's recipe), cached under <out>/store/lds/ (a rerun loads it).
2. For each method and k: the pipeline's stages on Ray (index, query gradients,
   preconditioner), then precondition.damping=auto's selection: delta from the grid by LDS
   on a seeded 10 % validation split of the queries, LDS (bootstrap 95 % CI) reported on
   the other 90 %. Also reported: the best delta for the held-out queries themselves
   (an oracle, for reference) and the delta the label proxy (no ground truth) would pick.
   Layers whose gradient has at most k entries are kept whole (identity): the table lists
   the dimension each layer really got.
3. The exact ceiling: all-parameter influence through the n x n Gram matrix (Woodbury),
   damping chosen the same way.
4. A CNN (Conv2d through flat GraSS) attributed end to end: its own ground truth, then
   run.attribute with damping=auto and dense scores, then jobs.lds's evaluation.
5. A payload for bench/bench_lds_dattri.py (same model, data, subsets, outputs, split).
Writes bench/results/lds.json and bench/results/lds.md (with dattri's row if present).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import ray
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from lds_table import RESULTS, write_table  # noqa: E402

from grass_dist import pipeline, run  # noqa: E402
from grass_dist.build import build_dataset, build_model, build_task  # noqa: E402
from grass_dist.config import JobConfig, register_configs  # noqa: E402
from grass_dist.fidelity import damping, evaluate, ground_truth  # noqa: E402
from grass_dist.fidelity.exact import ExactInfluence, all_parameter_gradients  # noqa: E402
from grass_dist.fidelity.metric import lds_from_predictions, predictions  # noqa: E402
from grass_dist.gradients.capture import resolve_layers  # noqa: E402
from grass_dist.index import Store  # noqa: E402
from grass_dist.scoring.results import ArtifactDir  # noqa: E402

METHODS = [
    ("FactGraSS", "factgrass"),
    ("GraSS", "grass"),
    ("Selective-Mask FactGraSS", "selective_factgrass"),
    ("LoGra", "logra"),
    ("dense Gaussian", "gaussian"),
    ("SJLT only", "sjlt"),
    ("RM only", "random_mask"),
]


def compose_raw(args, *overrides: str) -> dict:
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                f"data.train.n_train={args.n_train}",
                f"data.train.n_query={args.n_query}",
                f"lds.subsets={args.subsets}",
                f"lds.seeds={args.seeds}",
                "lds.cpus_per_task=1",
                f"run.output_dir={args.out}",
                f"store.url={args.out}/store",
                "cluster.num_workers=2",
                "precondition.damping=auto",
                *overrides,
            ],
        )
    return OmegaConf.to_container(cfg, resolve=True)


def whole_layers(raw: dict, k: int) -> list[str]:
    """Overrides keeping layers with at most k gradient entries exact (identity)."""
    job = JobConfig.from_cfg(raw)
    shapes = resolve_layers(build_model(job), job.index.layers)
    return [f"+compression.overrides.{n}=identity" for n, s in shapes.items() if s.numel <= k]


def heldout_curve(sums: np.ndarray, y: np.ndarray, n_delta: int) -> list[float]:
    q = y.shape[1]
    return [lds_from_predictions(sums[:, d * q : (d + 1) * q], y, 0).mean for d in range(n_delta)]


def attribute_method(args, method: str, k: int, gt) -> dict:
    raw = compose_raw(args, f"compression={method}", f"compression.k={k}")
    raw = compose_raw(
        args,
        f"compression={method}",
        f"compression.k={k}",
        f"index.url={args.out}/idx/{method}-{k}",
        *whole_layers(raw, k),
    )
    job = pipeline.prepare(raw)
    try:
        pipeline.run_index(job)
        query = pipeline.query_phi(job)
        pipeline.release_workers(job)
        pipeline.run_precondition(job)
        t0 = time.perf_counter()
        member = pipeline.members_of([job], [query])[0]
        selection = damping.choose([member], job.cfg, job.n_train)
        job.timings["damping_sweep"] = time.perf_counter() - t0
        p = job.cfg.precondition
        val, test = damping.validation_split(args.n_query, p.validation, p.validation_seed)
        grid = [float(d) for d in p.grid]
        curve = heldout_curve(
            member.predictions(test, grid, gt.masks, 1).sums, gt.y[:, test], len(grid)
        )
        proxy = damping.by_proxy([member], job.cfg, val, test, grid, p.proxy_topk)
    finally:
        pipeline.shutdown(job)
    layers = {s["name"]: f"{s['method']}:{s['k']}" for s in job.index.fingerprint["layers"]}
    return {
        "method": method,
        "k": k,
        "layers": layers,
        "selection": selection,
        "heldout_curve": curve,
        "proxy_chosen": proxy["chosen"],
        "proxy_heldout_lds": curve[grid.index(proxy["chosen"])],
        "seconds": {n: round(v, 2) for n, v in job.timings.items()},
    }


def exact_ceiling(args, gt) -> dict:
    raw = compose_raw(args)
    job = JobConfig.from_cfg(raw)
    model, task = build_model(job), build_task(job)
    t0 = time.perf_counter()
    train = all_parameter_gradients(model, task, build_dataset(job, "train"))
    query = all_parameter_gradients(model, task, build_dataset(job, "query"))
    exact = ExactInfluence.fit(train)
    p = job.precondition
    val, test = damping.validation_split(args.n_query, p.validation, p.validation_seed)
    grid = [float(d) for d in p.grid]
    yhat = {d: predictions(gt.masks, exact.scores(query, d)) for d in grid}
    values = [lds_from_predictions(yhat[d][:, val], gt.y[:, val], 0).mean for d in grid]
    best = damping.best_delta(values, grid)
    held = lds_from_predictions(yhat[best][:, test], gt.y[:, test], job.lds.bootstrap)
    curve = [lds_from_predictions(yhat[d][:, test], gt.y[:, test], 0).mean for d in grid]
    return {
        "method": "exact",
        "params": int(train.shape[1]),
        "selection": {"grid": grid, "values": values, "chosen": best, "heldout": held.summary()},
        "heldout_curve": curve,
        "seconds": {"total": round(time.perf_counter() - t0, 2)},
    }


def cnn_end_to_end(args) -> dict:
    cnn = [
        "model=digits_cnn",
        f"model.channels=[{args.cnn_channels}]",
        "index.layers=[conv1,conv2,fc1,out]",
        "compression=factgrass",
        f"compression.k={args.cnn_k}",
        f"index.url={args.out}/idx/cnn",
        "scoring.dense=true",
        "run.name=cnn",
    ]
    raw = compose_raw(args, *cnn)
    raw = compose_raw(args, *cnn, *whole_layers(raw, args.cnn_k))
    gt, built = ground_truth.ensure(JobConfig.from_cfg(raw), raw)
    summary = run.attribute(OmegaConf.create(raw))
    where = ArtifactDir(Store(raw["index"]["url"]))
    evaluated = evaluate.evaluate_results(where, "cnn", gt, JobConfig.from_cfg(raw).lds.bootstrap)
    return {
        "overrides": cnn,
        "layers": {s["name"]: s for s in _fingerprint_layers(raw)},
        "ground_truth": {
            "digest": gt.digest,
            "built_now": built,
            "train_seconds": gt.spec.get("train_seconds"),
            "seed_agreement": _seed_agreement(gt),
        },
        "selection": summary["damping"],
        "lds": evaluated,
        "stage_seconds": summary["stage_seconds"],
    }


def _fingerprint_layers(raw: dict) -> list[dict]:
    from grass_dist.index import GradientIndex

    return GradientIndex.open(raw["index"]["url"]).fingerprint["layers"]


def dattri_payload(args, gt) -> str:
    """Everything bench_lds_dattri.py needs, as plain tensors (it runs without grass_dist)."""
    job = JobConfig.from_cfg(compose_raw(args))
    model = build_model(job)
    train, query = build_dataset(job, "train"), build_dataset(job, "query")
    p = job.precondition
    val, test = damping.validation_split(args.n_query, p.validation, p.validation_seed)
    payload = {
        "state_dict": model.state_dict(),
        "hidden": list(job.model["hidden"]),
        "train_x": torch.stack([train[i][0] for i in range(len(train))]),
        "train_y": torch.stack([train[i][1] for i in range(len(train))]),
        "query_x": torch.stack([query[i][0] for i in range(len(query))]),
        "query_y": torch.stack([query[i][1] for i in range(len(query))]),
        "masks": torch.tensor(gt.masks),
        "y": torch.tensor(gt.y),
        "val": torch.from_numpy(val),
        "test": torch.from_numpy(test),
        "grid": [float(d) for d in p.grid],
        "bootstrap": job.lds.bootstrap,
    }
    path = os.path.join(args.out, "dattri_payload.pt")
    torch.save(payload, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-query", type=int, default=200)
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ks", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--methods", nargs="+", default=[m for _, m in METHODS])
    ap.add_argument("--cnn-channels", default="8,16")
    ap.add_argument("--cnn-k", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "bench_lds"))
    ap.add_argument("--results", default=RESULTS, help="writes <results>.json and .md")
    args = ap.parse_args()
    args.out = os.path.abspath(args.out)
    t_start = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    load = os.getloadavg()[0]

    raw = compose_raw(args)
    t0 = time.perf_counter()
    gt, built = ground_truth.ensure(JobConfig.from_cfg(raw), raw)
    report = {
        "command": " ".join([".venv/bin/python bench/bench_lds.py", *sys.argv[1:]]),
        "setting": {k: getattr(args, k) for k in ("n_train", "n_query", "subsets", "seeds", "ks")},
        "model": {k: v for k, v in raw["model"].items() if k != "cache_dir"},
        "load_average_at_start": load,
        "ground_truth": {
            "digest": gt.digest,
            "built_now": built,
            "seconds": round(time.perf_counter() - t0, 1),
            "train_seconds": gt.spec.get("train_seconds"),  # measured when it was built
            "seed_agreement": _seed_agreement(gt),
        },
        "dattri_payload": dattri_payload(args, gt),
        "rows": [],
    }
    report["exact"] = exact_ceiling(args, gt)
    for k in args.ks:
        for method in args.methods:
            print(f"--- {method} k={k}", flush=True)
            report["rows"].append(attribute_method(args, method, k, gt))
            _save(report, args.results)
    report["cnn"] = cnn_end_to_end(args)
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    _save(report, args.results)
    print(write_table(args.results))


def _seed_agreement(gt) -> float:
    """LDS of one seed's outputs predicting another's: the noise ceiling of the targets."""
    if gt.y_seeds.shape[0] < 2:
        return float("nan")
    return lds_from_predictions(gt.y_seeds[0], gt.y_seeds[1], 0).mean


def _save(report: dict, prefix: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(report, f, indent=1, default=float)


if __name__ == "__main__":
    main()
