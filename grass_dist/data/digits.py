"""scikit-learn's bundled 8x8 handwritten digits as disjoint train / query splits.

The data ships inside scikit-learn, so no download is needed. Both splits come from one
seeded permutation of all 1797 images: the first `n_train` rows are "train" and the next
`n_query` rows are "query", so the two splits never share an image.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

from grass_dist.errors import ConfigError

N_DIGITS = 1797
SPLITS = ("train", "query")


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    """(pixels (1797, 64) float32 in 0..16, labels (1797,) int64), as `load_digits()` gives.

    Read from the CSV file scikit-learn ships, as `load_digits` reads it, without importing
    scikit-learn: that import costs each process that builds the data (the driver and
    every worker, at the same time, before the first shard) about 1 CPU-second and 100
    MiB. A scikit-learn that keeps the file elsewhere is asked through `load_digits`.
    Cached because every worker builds both splits; callers index (copy) and never mutate.
    """
    path = _bundled_csv()
    if path is not None:
        with gzip.open(path, "rt") as f:
            data = np.loadtxt(f, delimiter=",")
        if data.shape == (N_DIGITS, 65):
            return data[:, :-1].astype(np.float32), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64)


def _bundled_csv() -> str | None:
    """scikit-learn's digits.csv.gz, found without importing scikit-learn; None if absent."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    return path if os.path.isfile(path) else None


class DigitsDataset(Dataset):
    """Digit images as flat float vectors with integer labels.

    Items are `(x, label)`: x is a float32 tensor of shape (64,) in [0, 1] (pixel / 16),
    label an int64 scalar tensor in 0..9.

    Attributes:
        labels: int64 array of shape (N,).
        keys: N stable ids `"digits/<index in load_digits()>"`, independent of the split seed.
        size_arguments: arguments of `digits` that only add rows at the end of this split
            (see `grass_dist.data.identity`): n_train and n_query for "train", none for
            "query" (its rows start after the first n_train).
    """

    def __init__(
        self,
        pixels: np.ndarray,
        labels: np.ndarray,
        source_rows: np.ndarray,
        size_arguments: tuple[str, ...] = (),
    ):
        """pixels (N, 64) in 0..16, labels (N,), source_rows (N,) indices into load_digits()."""
        self._x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32) / 16.0)
        self._y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.labels = self._y.numpy()
        self.keys = [f"digits/{int(r)}" for r in source_rows]
        self.size_arguments = size_arguments

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(i)
        return self._x[i], self._y[i]

    def describe(self, i: int) -> dict:
        """Rendering protocol of the report: key, label (int) and an (8, 8) image in [0, 1]."""
        i = int(i)
        return {
            "key": self.keys[i],
            "label": int(self.labels[i]),
            "image": self._x[i].numpy().reshape(8, 8).astype(np.float64),
        }


def digits(
    split: str = "train", n_train: int = 1000, n_query: int = 100, seed: int = 0
) -> DigitsDataset:
    """One split of the digits data.

    Args:
        split: "train" (the first `n_train` shuffled rows) or "query" (the next `n_query`).
        n_train, n_query: split sizes; both >= 1 and n_train + n_query <= 1797.
        seed: seed of the shuffle; the train and query configs must use the same one.

    Returns:
        A DigitsDataset of n_train or n_query items, each ((64,) float32, () int64).
    """
    if split not in SPLITS:
        raise ValueError(f"data split={split!r} is unknown; use one of {list(SPLITS)}")
    where = f"data.{split}"
    for name, value in (("n_train", n_train), ("n_query", n_query)):
        if not 1 <= value <= N_DIGITS - 1:
            raise ConfigError(f"{where}.{name}={value} must be in [1, {N_DIGITS - 1}]")
    if n_train + n_query > N_DIGITS:
        raise ConfigError(
            f"{where}.n_train + {where}.n_query = {n_train + n_query}, but digits has only "
            f"{N_DIGITS} images: choose n_train + n_query in [2, {N_DIGITS}]"
        )
    pixels, labels = _load()
    order = np.random.default_rng(seed).permutation(N_DIGITS)
    if split == "train":
        rows = order[:n_train]
        return DigitsDataset(pixels[rows], labels[rows], rows, ("n_train", "n_query"))
    rows = order[n_train : n_train + n_query]
    return DigitsDataset(pixels[rows], labels[rows], rows)
