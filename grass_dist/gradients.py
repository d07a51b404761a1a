"""Compressed per-sample gradients (phi) of a model over rows of a dataset."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from grass_dist.capture import LinearCapture
from grass_dist.compress import LinearCompressor
from grass_dist.errors import NonFiniteGradientError


def sample_key(dataset, row: int) -> str:
    """The stable key of a dataset row: `dataset.keys[row]` if it has keys, else the row."""
    keys = getattr(dataset, "keys", None)
    return str(keys[row]) if keys is not None and not callable(keys) else str(row)


@dataclass
class PhiBlock:
    """Compressed gradients of some rows: phi[layer] is (n, k_layer) float32."""

    row_ids: np.ndarray
    keys: list[str]
    phi: dict[str, np.ndarray]


@dataclass
class LoadedRows:
    """Rows read and collated ahead of compute: batches are (row list, collated batch)."""

    row_ids: np.ndarray
    keys: list[str]
    batches: list[tuple[list[int], Any]]


class GradientComputer:
    """Runs forward/backward with capture hooks and compresses every captured layer."""

    def __init__(
        self,
        model: nn.Module,
        task,
        compressors: dict[str, LinearCompressor],
        device: torch.device | str = "cpu",
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        # Layer outputs are the differentiation targets, so they must require grad;
        # weight gradients themselves are never computed (see capture.py).
        self.model.requires_grad_(True)
        self.task = task
        self.compressors = {n: c.to(self.device) for n, c in compressors.items()}
        self.capture = LinearCapture(self.model, list(compressors))

    def phi_batch(self, batch) -> dict[str, torch.Tensor]:
        """One collated batch -> {layer: (B, k) float32} on the compute device."""
        batch = self.task.to(batch, self.device)
        with self.capture.recording():
            losses = self.task.per_sample_loss(self.model, batch)
        factors = self.capture.factors(losses)
        with torch.no_grad():
            return {n: self.compressors[n].compress(x, g) for n, (x, g) in factors.items()}

    def phi_rows(self, dataset, rows: Sequence[int], batch_size: int) -> PhiBlock:
        """phi for the given dataset rows, computed in batches of `batch_size`."""
        return self.phi_loaded(self.load_rows(dataset, rows, batch_size))

    def load_rows(self, dataset, rows: Sequence[int], batch_size: int) -> LoadedRows:
        """Read and collate `rows` into batches of `batch_size` (no model work)."""
        rows = list(rows)
        chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        return LoadedRows(
            row_ids=np.asarray(rows, dtype=np.int64),
            keys=[sample_key(dataset, r) for r in rows],
            batches=[(c, self.task.collate([dataset[r] for r in c])) for c in chunks],
        )

    def phi_loaded(
        self, loaded: LoadedRows, on_batch: Callable[[int], None] | None = None
    ) -> PhiBlock:
        """phi of rows collated by `load_rows`; `on_batch(n_rows)` runs after each batch."""
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.compressors}
        for chunk, batch in loaded.batches:
            for name, phi in self.phi_batch(batch).items():
                if not torch.isfinite(phi).all():
                    raise NonFiniteGradientError(
                        f"non-finite gradients in layer {name!r} for rows {chunk[0]}..{chunk[-1]}"
                        f": check the model's loss on these examples (NaN/inf inputs or labels, "
                        f"or a diverged checkpoint)"
                    )
                parts[name].append(phi.cpu().numpy())
            if on_batch is not None:
                on_batch(len(chunk))
        phi = {
            n: np.concatenate(p) if p else np.zeros((0, self.compressors[n].out_dim), np.float32)
            for n, p in parts.items()
        }
        return PhiBlock(row_ids=loaded.row_ids, keys=loaded.keys, phi=phi)
