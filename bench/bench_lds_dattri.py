"""dattri 0.3.0's FactGraSSAttributor on bench_lds.py's model, data, ground truth and split.

    .venv-dattri/bin/python bench/bench_lds_dattri.py [--k 4096]

Runs in its own environment (dattri is not a project dependency):

    python3 -m venv .venv-dattri
    .venv-dattri/bin/python -m pip install torch==2.13.0
    .venv-dattri/bin/python -m pip install dattri==0.3.0

It reads outputs/bench_lds/dattri_payload.pt (written by bench/bench_lds.py: the trained
MLP's weights, the train and query tensors, the LDS subsets and outputs, the validation
split and the damping grid). dattri 0.3.0 builds its compressors from the first example
of a batch, so every input gets a leading singleton axis, (1, 64), and the model starts
with a Flatten. On CPU its second stage is a dense Gaussian (its SJLT is CUDA-only).
Gradients are cached once; each damping of the grid recomputes only dattri's
preconditioners and inverse-Hessian-vector products (its public `compute_preconditioners`
/ `compute_ifvp`), then `attribute`. Damping is relative in dattri as in grass_dist
(delta * trace(H) / k). delta is chosen by LDS on the same validation queries, and LDS
is reported on the same held-out queries, as for grass_dist. Writes
bench/results/lds_dattri.json and re-renders bench/results/lds.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from lds_table import RESULTS, write_table  # noqa: E402

from grass_dist.fidelity.metric import lds_from_predictions, predictions  # noqa: E402 -- numpy only


def mlp(hidden: list[int]) -> nn.Sequential:
    """The digits MLP with a leading Flatten: (B, 1, 64) -> (B, 10); same parameter names."""
    widths = [64, *hidden]
    layers: OrderedDict[str, nn.Module] = OrderedDict(flat=nn.Flatten())
    for i in range(len(hidden)):
        layers[f"fc{i + 1}"] = nn.Linear(widths[i], widths[i + 1])
        layers[f"act{i + 1}"] = nn.ReLU()
    layers["out"] = nn.Linear(widths[-1], 10)
    return nn.Sequential(layers)


def loss(model: nn.Module, batch, device: str) -> torch.Tensor:
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs.to(device)), targets.to(device))


def attribute(payload: dict, k: int, cache_dir: str) -> dict:
    import dattri
    from dattri.algorithm import FactGraSSAttributor
    from dattri.task import AttributionTask

    model = mlp(payload["hidden"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    train = DataLoader(
        TensorDataset(payload["train_x"][:, None, :], payload["train_y"]), batch_size=64
    )
    query = DataLoader(
        TensorDataset(payload["query_x"][:, None, :], payload["query_y"]), batch_size=64
    )
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    grid = payload["grid"]
    attributor = FactGraSSAttributor(
        task=task,
        device="cpu",
        hessian="eFIM",
        damping=grid[0],
        proj_dim=k,
        offload="cpu",
        cache_dir=cache_dir,  # its batch metadata file goes here
    )
    t0 = time.perf_counter()
    attributor.cache(train)
    cache_seconds = time.perf_counter() - t0
    masks, y = payload["masks"].numpy(), payload["y"].numpy()
    val, test = payload["val"].numpy(), payload["test"].numpy()
    yhat = {}
    for delta in grid:
        attributor.compute_preconditioners(damping=delta)
        attributor.compute_ifvp()
        scores = attributor.attribute(train, query).detach().double().numpy()  # (n, Q)
        yhat[delta] = predictions(masks, scores)
    values = [lds_from_predictions(yhat[d][:, val], y[:, val], 0).mean for d in grid]
    finite = [(v, d) for v, d in zip(values, grid, strict=True) if np.isfinite(v)]
    best = max(finite)[1]
    held = lds_from_predictions(yhat[best][:, test], y[:, test], payload["bootstrap"])
    return {
        "version": dattri.__version__ if hasattr(dattri, "__version__") else "0.3.0",
        "k": k,
        "dims": ", ".join(f"RM+gaussian:{d}" for d in attributor.layer_dims),
        "grid": grid,
        "values": values,
        "chosen": best,
        "heldout": held.summary(),
        "heldout_curve": [lds_from_predictions(yhat[d][:, test], y[:, test], 0).mean for d in grid],
        "seconds": {"cache": round(cache_seconds, 2), "total": round(time.perf_counter() - t0, 2)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument(
        "--payload", default=os.path.join(ROOT, "outputs", "bench_lds", "dattri_payload.pt")
    )
    ap.add_argument("--results", default=RESULTS, help="bench_lds.py's --results prefix")
    args = ap.parse_args()
    python = os.path.relpath(sys.executable, ROOT)
    command = " ".join([python, "bench/bench_lds_dattri.py", *sys.argv[1:]])
    torch.set_num_threads(1)
    try:
        payload = torch.load(args.payload, weights_only=True)
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(args.payload)), "dattri_cache")
        os.makedirs(cache_dir, exist_ok=True)
        out = {"command": command, **attribute(payload, args.k, cache_dir)}
    except Exception as e:  # report exactly why dattri could not run, in the table too
        traceback.print_exc()
        out = {"command": command, "error": f"{type(e).__name__}: {e}"}
    with open(args.results + "_dattri.json", "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "values"}, indent=1))
    if os.path.exists(args.results + ".json"):
        print(write_table(args.results))


if __name__ == "__main__":
    main()
