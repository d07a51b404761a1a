"""Synthetic gradient indexes: random compressed gradients written straight into shards."""

from __future__ import annotations

import numpy as np

from grass_dist.index import GradientIndex


def fingerprint(layers: dict[str, int], dtype: str = "float32", tag: str = "synthetic") -> dict:
    return {
        "format_version": 1,
        "model": {"target": tag},
        "layers": [{"name": n, "k": k} for n, k in layers.items()],
        "dtype": dtype,
    }


def phi_rows(start: int, end: int, layers: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic phi for rows [start, end): row i depends only on (seed, i)."""
    out = {}
    for j, (name, k) in enumerate(layers.items()):
        rng = np.random.default_rng([seed, j, start])
        # Per-layer scales differ so that influence, grad-dot and cosine rank differently.
        out[name] = (rng.standard_normal((end - start, k), np.float32) * (1.0 + j)).astype(
            np.float32
        )
    return out


def write_index(
    url: str,
    n_rows: int,
    layers: dict[str, int],
    shard_rows: int,
    dtype: str = "float32",
    seed: int = 0,
) -> GradientIndex:
    """An index of `n_rows` random rows in shards of `shard_rows`, all committed."""
    index = GradientIndex.create_or_open(url, fingerprint(layers, dtype))
    records = []
    for start in range(0, n_rows, shard_rows):
        end = min(start + shard_rows, n_rows)
        rows = np.arange(start, end, dtype=np.int64)
        keys = [f"row-{r}" for r in rows]
        phi = phi_rows(start, end, layers, seed)
        records.append(index.write_shard(f"{start:09d}", start, end, rows, keys, phi))
    index.commit(records)
    return index


def read_all(index: GradientIndex) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every committed row (as stored, so float16 rounding included): rows, phi per layer."""
    parts = [data for _, data in index.iter_committed()]
    rows = np.concatenate([d.row_ids for d in parts])
    return rows, {n: np.concatenate([d.phi[n] for d in parts]) for n in parts[0].phi}
