"""The preconditioner's map work: Fisher partial sums over shard groups, which go
straight to per-layer factorisation calls (`build_fisher`), and parallel per-layer work on
a stored preconditioner (`layer_map`). The reducer runs them, as Ray tasks or on lent
workers (`runtime.executors`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import ray
import torch

from grass_dist.errors import NonFiniteShardError
from grass_dist.index import GradientIndex, ShardRecord
from grass_dist.index.shards import overflow_fix
from grass_dist.runtime.cluster import resources as cluster_resources
from grass_dist.runtime.cluster import threads_for
from grass_dist.runtime.executors import Executor, local_device, release_memory
from grass_dist.runtime.scoring import shard_groups
from grass_dist.scoring.fisher_sum import EMPTY_INDEX, FisherSum, fisher_matrix
from grass_dist.scoring.precondition import LayerFactor, LayerMap, Preconditioner, cholesky_factor


def fisher_part(index: GradientIndex, records: list[ShardRecord], verify: bool):
    """One map call's partial sums phi^T phi over `records`: one return per layer of the
    index, in its column order (so each goes to its own factorisation call)."""
    total = FisherSum.accumulate(finite_phi(index, records, verify))
    release_memory()
    sums = tuple(total.sums[name] for name, _ in index.layers)
    return sums if len(sums) > 1 else sums[0]


def finite_phi(
    index: GradientIndex, records: list[ShardRecord], verify: bool
) -> Iterator[dict[str, np.ndarray]]:
    """The phi of each of `records` in turn; once all are read, NonFiniteShardError naming
    those that hold NaN or inf (an index written before the storage cast was checked: its
    float16 shards hold inf where a gradient exceeded 65504), which would otherwise fail the
    factorisation with no word of the shard.

    A float64 sum is finite exactly when every float32 value is (it cannot overflow), so the
    check is one pass over the rows, beside the Fisher sum's k passes.
    """
    bad = []
    for record in records:
        phi = index.read(record, verify=verify).phi
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, as it should
            finite = all(np.isfinite(x.sum(dtype=np.float64)) for x in phi.values())
        if not finite:
            bad.append(record)
        yield phi
    if bad:
        shards = "; ".join(
            f"shard {r.shard_id} (rows {r.start}..{r.end - 1}, file {index.store.url_of(r.file)})"
            for r in bad
        )
        raise NonFiniteShardError(
            f"the gradient index at {index.store.url_of('')} holds NaN or inf gradients in "
            f"{shards}, so no preconditioner can be built from it (index.dtype={index.dtype} "
            f"written by a version that did not check the storage cast). Fix: "
            f"{overflow_fix(index.dtype)}."
        )


@ray.remote
def start_process() -> None:
    """Nothing: run once per map task while the reducer actor starts, so that the processes
    its map tasks will run in start and import (torch, this module) at the same time."""


def _apply(fn: Callable, tensors: dict[str, torch.Tensor]):
    """{name: fn(tensor)} for one group of layers, computed on this process's device
    (`local_device`), returned on the CPU."""
    device = local_device()
    return {name: _on_cpu(fn(t.to(device))) for name, t in tensors.items()}


def factor_layers(
    names: list[str], n: int, delta: float | None, *parts: np.ndarray
) -> dict[str, LayerFactor]:
    """Each layer of `names` from its partial sums (`parts` holds every layer's in turn, in
    map-call order): H, and with a numeric `delta` the Cholesky factor of H + lambda I
    (on this process's device)."""
    device = local_device()
    per = len(parts) // len(names)
    out = {}
    for j, name in enumerate(names):
        layer = out[name] = LayerFactor(fisher_matrix(parts[j * per : (j + 1) * per], n))
        if delta is not None:  # row-major (see cholesky_factor), as the store packs it
            layer.keep(delta, _on_cpu(cholesky_factor(layer.fisher.to(device), delta)))
    return out


def _on_cpu(result):
    return tuple(r.cpu() for r in result) if isinstance(result, tuple) else result.cpu()


def balanced_groups(sizes: dict[str, int], n_groups: int) -> list[list[str]]:
    """Layer names in at most `n_groups` groups of about equal sum k^3 (the factorisation
    cost): largest layer first, each to the group with the least work so far."""
    groups: list[list[str]] = [[] for _ in range(min(n_groups, len(sizes)))]
    work = [0] * len(groups)
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        lightest = work.index(min(work))
        groups[lightest].append(name)
        work[lightest] += sizes[name] ** 3
    return groups


def _per_layer_call(n_groups: int) -> dict[str, Any]:
    """`Executor.submit` options of one of `n_groups` per-layer calls made as tasks: a GPU
    each when the cluster has GPUs, else the cluster's CPUs shared out among them as
    threads."""
    resources = cluster_resources()
    if resources.get("GPU", 0) >= 1:
        return {"gpu": True, "threads": 1}
    return {"threads": threads_for(resources.get("CPU", 1) / n_groups)}


def layer_map(parallelism: int, ex: Executor | None = None) -> LayerMap:
    """A LayerMap that runs the layers as at most `parallelism` calls of `ex` (default: Ray
    tasks, on a GPU each when the cluster has GPUs, else on the CPUs shared out among
    them)."""
    ex = ex or Executor()

    def run(fn: Callable, tensors: dict[str, torch.Tensor]) -> dict:
        if not tensors:
            return {}
        sizes = {n: t.shape[0] for n, t in tensors.items()}
        groups = balanced_groups(sizes, parallelism)
        where = _per_layer_call(len(groups))
        fn_ref = ex.share(fn)
        refs = [
            ex.submit(i, _apply, fn_ref, {n: tensors[n] for n in g}, **where)
            for i, g in enumerate(groups)
        ]
        done: dict = {}
        for part in ex.get(refs):
            done.update(part)
        return {n: done[n] for n in tensors}

    return run


def build_fisher(
    index: GradientIndex,
    parallelism: int,
    verify: bool,
    delta: float | None,
    ex: Executor | None = None,
) -> Preconditioner:
    """The preconditioner of every committed shard: `parallelism` map calls of `ex`
    (default: Ray tasks) over shard groups sum phi^T phi, and per-layer calls (groups of
    about equal k^3) add up their layers' partial sums and, with a numeric `delta`,
    factorise them. The partial sums go from call to call, never through this process."""
    records = sorted(index.committed().values(), key=lambda r: r.start)
    if not records:
        raise ValueError(EMPTY_INDEX)
    ex = ex or Executor()
    layers = dict(index.layers)
    groups = shard_groups(records, parallelism)
    parts: dict[str, list] = {name: [] for name in layers}
    for i, group in enumerate(groups):  # per layer, in submission order: the same sums
        refs = ex.submit(i, fisher_part, index, group, verify, num_returns=len(layers))
        for name, ref in zip(layers, refs if len(layers) > 1 else [refs], strict=True):
            parts[name].append(ref)
    n = sum(r.rows for r in records)
    layer_groups = balanced_groups(layers, parallelism)
    where = _per_layer_call(len(layer_groups))
    refs = [
        ex.submit(i, factor_layers, names, n, delta, *(p for m in names for p in parts[m]), **where)
        for i, names in enumerate(layer_groups)
    ]
    done: dict[str, LayerFactor] = {}
    for part in ex.get(refs):
        done.update(part)
    return Preconditioner({name: done[name] for name in layers}, n, delta, fisher_source(records))


def fisher_source(records: Iterable[ShardRecord]) -> str:
    """What a Fisher sum is a function of: the committed shard files (ids, rows and sha256),
    as a digest; a preconditioner saved with the same one needs no new pass over the index."""
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.shard_id):
        h.update(f"{r.shard_id}:{r.start}:{r.end}:{r.rows}:{r.sha256};".encode())
    return h.hexdigest()
