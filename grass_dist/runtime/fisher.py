"""The preconditioner's Ray tasks: Fisher map tasks over shard groups, whose per-layer
partial sums go straight to per-layer factorisation tasks (`build_fisher`), and parallel
per-layer work on a stored preconditioner (`layer_map`). The reducer runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch

from grass_dist.index import GradientIndex, ShardRecord
from grass_dist.runtime.cluster import threads_for
from grass_dist.runtime.scoring import release_memory, shard_groups
from grass_dist.scoring.precondition import (
    EMPTY_INDEX,
    FisherSum,
    LayerFactor,
    LayerMap,
    Preconditioner,
    cholesky_factor,
    fisher_matrix,
)


@ray.remote
def _fisher_task(index: GradientIndex, records: list[ShardRecord], verify: bool):
    """One map task's partial sums phi^T phi over `records`: one return per layer of the
    index, in its column order (so each goes to its own factorisation task)."""
    torch.set_num_threads(1)  # its one CPU (a user's OMP_NUM_THREADS would oversubscribe)
    total = FisherSum.accumulate(index.read(record, verify=verify).phi for record in records)
    release_memory()
    sums = tuple(total.sums[name] for name, _ in index.layers)
    return sums if len(sums) > 1 else sums[0]


@ray.remote
def start_process() -> None:
    """Nothing: run once per map task while the reducer actor starts, so that the processes
    its map tasks will run in start and import (torch, this module) at the same time."""


@ray.remote
def _layers_task(fn: Callable, tensors: dict[str, torch.Tensor], threads: int, device: str):
    """{name: fn(tensor)} for one group of layers, computed on `device`, returned on the CPU."""
    torch.set_num_threads(threads)
    return {name: _on_cpu(fn(t.to(device))) for name, t in tensors.items()}


@ray.remote
def _factor_task(
    names: list[str], n: int, delta: float | None, threads: int, device: str, *parts: np.ndarray
) -> dict[str, LayerFactor]:
    """Each layer of `names` from its partial sums (`parts` holds every layer's in turn, in
    map-task order): H, and with a numeric `delta` the Cholesky factor of H + lambda I."""
    torch.set_num_threads(threads)
    per = len(parts) // len(names)
    out = {}
    for j, name in enumerate(names):
        layer = out[name] = LayerFactor(fisher_matrix(parts[j * per : (j + 1) * per], n))
        if delta is not None:
            # Row-major here, in parallel: LAPACK's column-major factor would be transposed
            # when the reducer packs it for the store.
            factor = cholesky_factor(layer.fisher.to(device), delta)
            layer.cholesky[delta] = factor.cpu().contiguous()
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


def _placement(task, n_groups: int) -> tuple[Any, int, str]:
    """(task options, torch threads, device) for `n_groups` factorisation tasks: a GPU each
    when the cluster has GPUs, else the cluster's CPUs shared out among them."""
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) >= 1:
        return task.options(num_gpus=1), threads_for(1), "cuda"
    return task, threads_for(resources.get("CPU", 1) / n_groups), "cpu"


def layer_map(parallelism: int) -> LayerMap:
    """A LayerMap that runs the layers as at most `parallelism` Ray tasks, on a GPU each
    when the cluster has GPUs, else on the CPUs shared out among the tasks."""

    def run(fn: Callable, tensors: dict[str, torch.Tensor]) -> dict:
        if not tensors:
            return {}
        groups = balanced_groups({n: t.shape[0] for n, t in tensors.items()}, parallelism)
        task, threads, device = _placement(_layers_task, len(groups))
        fn_ref = ray.put(fn)
        refs = [task.remote(fn_ref, {n: tensors[n] for n in g}, threads, device) for g in groups]
        done: dict = {}
        for part in ray.get(refs):
            done.update(part)
        return {n: done[n] for n in tensors}

    return run


def build_fisher(
    index: GradientIndex, parallelism: int, verify: bool, delta: float | None
) -> Preconditioner:
    """The preconditioner of every committed shard: map tasks (shard groups) sum
    phi^T phi, and per-layer tasks (groups of about equal k^3) add up their layers' partial
    sums and, with a numeric `delta`, factorise them. The partial sums go from task to task,
    never through this process."""
    records = sorted(index.committed().values(), key=lambda r: r.start)
    if not records:
        raise ValueError(EMPTY_INDEX)
    layers = dict(index.layers)
    groups = shard_groups(records, parallelism)
    parts: dict[str, list] = {name: [] for name in layers}
    for group in groups:  # per layer, in submission order: the same sums every run
        refs = _fisher_task.options(num_returns=len(layers)).remote(index, group, verify)
        for name, ref in zip(layers, refs if len(layers) > 1 else [refs], strict=True):
            parts[name].append(ref)
    n = sum(r.rows for r in records)
    layer_groups = balanced_groups(layers, parallelism)
    task, threads, device = _placement(_factor_task, len(layer_groups))
    refs = [
        task.remote(names, n, delta, threads, device, *(p for m in names for p in parts[m]))
        for names in layer_groups
    ]
    done: dict[str, LayerFactor] = {}
    for part in ray.get(refs):
        done.update(part)
    return Preconditioner({name: done[name] for name in layers}, n, delta)
