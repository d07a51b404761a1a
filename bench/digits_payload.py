"""The workload of bench/bench_job_vs_dattri.py, as a user's own package would hold it: one
payload file with a trained digits MLP and its rows, and the loaders that `jobs.attribute`'s
`model._target_` and `data.*._target_` name (`model=custom data=custom`).

The training rows are scikit-learn's digits made into `n_rows` rows (each a seeded one-pixel
shift of a digit plus seeded pixel noise); the queries are noisy copies of digits held out of
the training base. Imports torch only (and scikit-learn to make the rows), so dattri's
environment loads it too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from bench.models import digits_mlp_shape

HELD_OUT = 100  # digits images kept out of the training base: the queries' source
NOISE = 1.0  # std of the pixel noise (digits pixels are 0..16)


def load_model(path: str) -> torch.nn.Module:
    """The benchmark MLP with the payload's trained weights (the `model._target_`)."""
    model = digits_mlp_shape()
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    return model.eval()


def load_rows(path: str, split: str) -> TensorDataset:
    """The payload's `split` rows, (input (64,), label) pairs (the `data.*._target_`)."""
    payload = torch.load(path, weights_only=True)
    return TensorDataset(payload[f"{split}_x"], payload[f"{split}_y"])


def _shifted(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each 8x8 image rolled by a seeded -1, 0 or 1 pixel along each axis."""
    shifts = torch.randint(-1, 2, (len(images), 2), generator=gen)
    out = images.view(-1, 8, 8).clone()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            pick = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            out[pick] = out[pick].roll((dy, dx), dims=(1, 2))
    return out.view(-1, 64)


def make_rows(n_rows: int, n_queries: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`n_rows` training rows and `n_queries` queries from digits, deterministically."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    base = len(x) - HELD_OUT
    pick = torch.arange(n_rows) % base
    train_x = _shifted(x[pick], gen) + NOISE * torch.randn(n_rows, 64, generator=gen)
    query = base + torch.arange(n_queries) % HELD_OUT
    query_x = x[query] + NOISE * torch.randn(n_queries, 64, generator=gen)
    scale = 1.0 / 16.0  # pixels to about [0, 1], as grass_dist's digits data
    return {
        "train_x": train_x * scale,
        "train_y": y[pick],
        "query_x": query_x * scale,
        "query_y": y[query],
    }


def train(rows: dict[str, torch.Tensor], epochs: int, seed: int = 0) -> torch.nn.Module:
    """The MLP trained with Adam on the training rows (seeded, one thread: reproducible)."""
    model = digits_mlp_shape()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = rows["train_x"], rows["train_y"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    return model.eval()


def write_payload(path: Path, n_rows: int, n_queries: int, epochs: int) -> None:
    rows = make_rows(n_rows, n_queries)
    torch.save({"state_dict": train(rows, epochs).state_dict(), **rows}, path)
