"""Learned compressor state: fitted once by the driver, stored in the index, loaded by all.

The driver fits the masks of every learned layer (Selective Mask) on the per-sample
gradients of a seeded sample of training rows, before the index exists. Their bytes go to
`compressors/<layer>-<sha256>.safetensors` in the index store and their sha256 into the layer's
spec, hence into the fingerprint. Workers and the query side load the state back from the
index and check it against that sha256, so every gradient goes through the same mask.

A state file is named by its sha256 and written create-only, never replaced: two drivers
that create one index at once may each store a fit, and index.json, written once, names the
one that counts (a driver whose fit differs is refused by the fingerprint check).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import nn

from grass_dist.compress import (
    Compressor,
    GradSample,
    IdentityCompressor,
    LayerShape,
    LearnedCompressor,
    compressor_class,
    method_for,
)
from grass_dist.config import CompressionConfig
from grass_dist.errors import CorruptIndexError, FingerprintMismatchError
from grass_dist.gradients.computer import GradientComputer
from grass_dist.index import GradientIndex, Store
from grass_dist.runtime.seeding import generator

log = logging.getLogger(__name__)

STATE_DIR = "compressors"


def state_path(layer: str, sha256: str) -> str:
    """Where a layer's learned state with hex digest ``sha256`` lives in the index store."""
    return f"{STATE_DIR}/{layer}-{sha256}.safetensors"


def sample_rows(cfg: CompressionConfig, n_rows: int) -> tuple[list[int], list[int]]:
    """(fit rows, held-out rows): a seeded sample of distinct training rows.

    Sizes follow compression.selective.samples / holdout, shrunk (held-out to at most a
    quarter) when the training set is smaller than their sum.
    """
    s = cfg.selective
    holdout = min(s.holdout, max(1, n_rows // 4))
    samples = min(s.samples, n_rows - holdout)
    order = torch.randperm(n_rows, generator=generator(s.seed, "selective_rows")).tolist()
    return sorted(order[:samples]), sorted(order[samples : samples + holdout])


def _stack(parts: list[Any]) -> Any:
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[i] for p in parts]).cpu() for i in range(len(parts[0])))
    return torch.cat(parts).cpu()


def gradient_sample(
    computer: GradientComputer, dataset, rows: list[int], batch_size: int
) -> dict[str, Any]:
    """{layer: factors (x, g) or flat v} of `rows`, concatenated over batches, on the CPU."""
    parts: dict[str, list[Any]] = {}
    for lo in range(0, len(rows), batch_size):
        batch = computer.task.collate([dataset[r] for r in rows[lo : lo + batch_size]])
        for name, grad in computer.layer_gradients(batch).items():
            parts.setdefault(name, []).append(
                tuple(t.detach() for t in grad) if isinstance(grad, tuple) else grad.detach()
            )
    return {name: _stack(p) for name, p in parts.items()}


def fit_states(
    cfg: CompressionConfig,
    model: nn.Module,
    task,
    dataset,
    shapes: dict[str, LayerShape],
    layers: list[str],
    batch_size: int,
) -> dict[str, bytes]:
    """Fit the learned compressors of `layers` on the CPU; returns their state bytes."""
    fit_rows, held_rows = sample_rows(cfg, len(dataset))
    log.info(
        "fitting selective masks of %s on %d rows (%d held out)",
        layers,
        len(fit_rows),
        len(held_rows),
    )
    probes = {n: IdentityCompressor(n, shapes[n]) for n in layers}
    computer = GradientComputer(model, task, probes, "cpu")
    train = gradient_sample(computer, dataset, fit_rows, batch_size)
    held = gradient_sample(computer, dataset, held_rows, batch_size)
    states = {}
    threads = torch.get_num_threads()
    # One thread makes the fit, hence the stored mask, independent of the core count (and
    # its many small steps gain nothing from more).
    torch.set_num_threads(1)
    try:
        for name in layers:
            cls = compressor_class(method_for(cfg, name, shapes[name])[0])
            states[name] = cls.fit(cfg, name, shapes[name], GradSample(train[name], held[name]))
    finally:
        torch.set_num_threads(threads)
    return states


def _stored_layers(index: GradientIndex) -> dict[str, dict[str, Any]]:
    return {str(d["name"]): d for d in index.fingerprint.get("layers", [])}


def load_states(index: GradientIndex, layers: list[str]) -> dict[str, bytes]:
    """The stored state of each of `layers`, checked against the index's fingerprint."""
    stored = _stored_layers(index)
    states = {}
    for name in layers:
        sha = stored.get(name, {}).get("state_sha256")
        if sha is None:
            raise FingerprintMismatchError(
                f"the gradient index at {index.store.url_of('')} holds no learned compressor "
                f"for layer {name!r} (it was built with method "
                f"{stored.get(name, {}).get('method')!r}). Fix: use the index's compression "
                f"settings, or a new store.url for these."
            )
        data = b""
        # Indexes written before states were content-addressed keep them under the layer's
        # name alone; the sha256 check below holds either file to the fingerprint.
        for path in (state_path(name, sha), f"{STATE_DIR}/{name}.safetensors"):
            try:
                data = index.get_artifact(path)
                break
            except FileNotFoundError:
                continue
        if hashlib.sha256(data).hexdigest() != sha:
            raise CorruptIndexError(
                f"{index.store.url_of(state_path(name, sha))} is missing or does not match the "
                f"sha256 in the index fingerprint. Fix: restore it, or rebuild the index under "
                f"a new store.url."
            )
        states[name] = data
    return states


def save_states(store: Store, compressors: dict[str, Compressor]) -> None:
    """Store each learned compressor's state create-only under its sha256 (see the module).

    Raises:
        CorruptIndexError: the file named by a state's sha256 holds other bytes.
    """
    for name, comp in compressors.items():
        if not isinstance(comp, LearnedCompressor):
            continue
        path = state_path(name, hashlib.sha256(comp.state).hexdigest())
        if not store.create_only(path, comp.state):
            raise CorruptIndexError(
                f"{store.url_of(path)} does not hold the bytes its name's sha256 stands for. "
                "Fix: delete that file and rerun, or use a new store.url."
            )
        log.info("stored the learned compressor of %s at %s", name, store.url_of(path))
