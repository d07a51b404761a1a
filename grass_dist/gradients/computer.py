"""Compressed per-sample gradients (phi) of a model over rows of a dataset."""

from __future__ import annotations

import copy
import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from grass_dist.compress import Compressor, LinearShape
from grass_dist.data.items import sample_key
from grass_dist.errors import (
    BadRowsError,
    BadTokensError,
    GrassError,
    NonFiniteGradientError,
    NonFiniteLossError,
    listed,
)
from grass_dist.gradients.capture import LinearCapture, counting_calls
from grass_dist.gradients.fast_paths import activation_gradients, fusable_modules
from grass_dist.gradients.persample import FlatGradients, check_losses
from grass_dist.index.content import row_digests
from grass_dist.runtime import compute_thread

log = logging.getLogger(__name__)


@dataclass
class PhiBlock:
    """Compressed gradients of some rows: phi[layer] is (n, k_layer) float32."""

    row_ids: np.ndarray
    keys: list[str]
    phi: dict[str, np.ndarray]


def all_finite(phi: torch.Tensor) -> bool:
    """Whether every entry of `phi` is finite.

    NaN and inf propagate through a sum, so a finite sum proves it without the entrywise
    pass (40x cheaper at 256 x 4096); only a sum that overflowed needs the full check.
    """
    return bool(torch.isfinite(phi.sum())) or bool(torch.isfinite(phi).all())


def _compress(
    comp: Compressor, grad: tuple[torch.Tensor, torch.Tensor] | torch.Tensor
) -> torch.Tensor:
    return comp.compress(*grad) if isinstance(grad, tuple) else comp.compress_flat(grad)


@dataclass
class LoadedRows:
    """Rows read and collated ahead of compute.

    Attributes:
        row_ids: int64 (n,). keys: n sample keys.
        digests: uint8 (n, 32), each row's content digest (``grass_dist.index.content``).
        batches: (positions in row_ids, collated batch) per batch, in the task's order.
        item: position in row_ids -> that row's item read again (to find, when a batch
            fails, the rows it failed for).
        source: what the rows are called in messages ("data.query rows", or "rows").
    """

    row_ids: np.ndarray
    keys: list[str]
    digests: np.ndarray
    batches: list[tuple[list[int], Any]]
    item: Callable[[int], Any] | None = None
    source: str = "rows"


def as_computed(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` as the computer runs it: on `device`, in eval mode, every parameter requiring
    grad. Layer outputs are the differentiation targets, so they must require grad; weight
    gradients themselves are never computed (see capture.py)."""
    model = model.to(device).eval()
    model.requires_grad_(True)
    return model


def module_calls(model: nn.Module, task, item: Any) -> Counter[str]:
    """How often each named module runs in the forward the computer makes of `item` (as
    `as_computed`, with autograd on: a forward without it may take other paths, such as
    PyTorch's fused transformer layers, which call no Linear module)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    model = as_computed(model, device)
    with torch.enable_grad(), counting_calls(model) as calls:
        task.per_sample_loss(model, task.to(task.collate([item]), device))
    return calls


class GradientComputer:
    """Per-sample gradients of the chosen layers, compressed by each layer's compressor.

    Linear layers: one forward/backward with capture hooks gives their factors (x, g).
    Other layers: `torch.func` gives their flat per-sample gradients (a second pass, only
    when such layers are chosen).

    On the CPU, `lanes` > 1 computes that many batches of a `phi_loaded` at once, each lane
    on torch's thread count // lanes threads with a copy of the model's modules of its own
    (the weights shared, not copied): a lane's batch of one thread keeps that thread's
    cores busier than one batch split across all of them (bench/results/vs_bergson.md).
    A row's phi depends on the threads per lane, as it does on the threads of one batch.
    """

    def __init__(
        self,
        model: nn.Module,
        task,
        compressors: dict[str, Compressor],
        device: torch.device | str = "cpu",
        lanes: int = 1,
    ):
        self.device = torch.device(device)
        self.model = as_computed(model, self.device)
        self.task = task
        self.compressors = {n: c.to(self.device) for n, c in compressors.items()}
        # Copied before the capture's hooks go on, so that no copy carries them.
        self._lane_models = _lane_copies(self.model, lanes if self.device.type == "cpu" else 1)
        self.lanes = 1 + len(self._lane_models)
        self._lane_computers: list[GradientComputer] | None = None
        linear = [n for n, c in compressors.items() if isinstance(c.shape, LinearShape)]
        flat = [n for n in compressors if n not in linear]
        self.capture = LinearCapture(self.model, linear) if linear else None
        self.fused = fusable_modules(self.model)
        self.flat = FlatGradients(self.model, task, flat) if flat else None

    def layer_gradients(self, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor] | torch.Tensor]:
        """One collated batch -> {Linear layer: (x (B, T, d_in), g (B, T, d_out)),
        other layer: v (B, p)} on the compute device, in the compressors' layer order."""
        batch = self.task.to(batch, self.device)
        out: dict[str, tuple[torch.Tensor, torch.Tensor] | torch.Tensor] = {}
        if self.capture is not None:
            with self.capture.recording(), activation_gradients(self.fused):
                losses = self.task.per_sample_loss(self.model, batch)
            check_losses(losses)
            out.update(self.capture.factors(losses))
        if self.flat is not None:
            out.update(self.flat.per_sample(batch))
        return {n: out[n] for n in self.compressors}

    def phi_batch(self, batch) -> dict[str, torch.Tensor]:
        """One collated batch -> {layer: (B, k) float32} on the compute device."""
        grads = self.layer_gradients(batch)
        with torch.no_grad():
            return {n: _compress(self.compressors[n], g) for n, g in grads.items()}

    def _failing_alone(self, loaded: LoadedRows, group: list[int]) -> list[int]:
        """The positions of `group` whose loss fails on its own, forward only: the rows
        whose error failed their batch (none found where only their mix fails)."""
        if loaded.item is None:
            return []
        bad = []
        for j in group:
            try:
                with torch.no_grad():
                    batch = self.task.to(self.task.collate([loaded.item(j)]), self.device)
                    self.task.per_sample_loss(self.model, batch)
            except Exception:  # noqa: BLE001 -- any error of the row's own is what is looked for
                bad.append(j)
        return bad

    def _batches(self, items: list, batch_size: int) -> list[list[int]]:
        """Positions of `items` per batch: the task's plan (e.g. by token budget) or chunks."""
        if hasattr(self.task, "plan_batches"):
            return self.task.plan_batches(items, batch_size)
        return [
            list(range(s, min(s + batch_size, len(items))))
            for s in range(0, len(items), batch_size)
        ]

    def phi_rows(self, dataset, rows: Sequence[int], batch_size: int) -> PhiBlock:
        """phi for the given dataset rows, in row order, from batches of <= `batch_size` rows."""
        return self.phi_loaded(self.load_rows(dataset, rows, batch_size))

    def load_rows(
        self, dataset, rows: Sequence[int], batch_size: int, source: str = "rows"
    ) -> LoadedRows:
        """Read `rows`, digest their content and collate them into the task's batches (no
        model work). `source` names the rows in errors, e.g. "data.query rows"."""
        rows = list(rows)
        items = [dataset[r] for r in rows]
        batches = []
        for group in self._batches(items, batch_size):
            with _naming_rows(rows, group, "collate", source):
                batches.append((group, self.task.collate([items[j] for j in group])))
        return LoadedRows(
            row_ids=np.asarray(rows, dtype=np.int64),
            keys=[sample_key(dataset, r) for r in rows],
            digests=row_digests(items),
            batches=batches,
            item=lambda j: dataset[rows[j]],
            source=source,
        )

    def phi_loaded(
        self, loaded: LoadedRows, on_batch: Callable[[int], None] | None = None
    ) -> PhiBlock:
        """phi of rows read by `load_rows`; `on_batch(n_rows)` runs after each batch (in a
        computer of several lanes, from the lane that computed it, one call at a time)."""
        n = len(loaded.row_ids)
        phi = {name: np.zeros((n, c.out_dim), np.float32) for name, c in self.compressors.items()}
        counted = threading.Lock()

        def one(computer: GradientComputer, group: list[int], batch: Any) -> None:
            for name, block in computer._checked_phi(loaded, group, batch).items():
                phi[name][group] = block.cpu().numpy()
            if on_batch is not None:
                with counted:
                    on_batch(len(group))

        if self.lanes > 1 and len(loaded.batches) > 1:
            self._by_lanes(loaded.batches, one)
        else:
            for group, batch in loaded.batches:
                one(self, group, batch)
        return PhiBlock(row_ids=loaded.row_ids, keys=loaded.keys, phi=phi)

    def _by_lanes(self, batches: list[tuple[list[int], Any]], one: Callable[..., None]) -> None:
        """one(computer, group, batch) for every batch, `lanes` at a time, each lane taking
        the next batch as it ends one. What a lane raises stops the others taking more, and
        the first failing batch's error is raised: the one a single lane would raise."""
        if self._lane_computers is None:
            self._lane_computers = [
                GradientComputer(m, self.task, self.compressors, self.device)
                for m in self._lane_models
            ]
        todo = iter(enumerate(batches))
        taking = threading.Lock()
        failed: dict[int, BaseException] = {}
        threads = torch.get_num_threads()
        per_lane = max(1, threads // self.lanes)

        def lane(computer: GradientComputer) -> None:
            torch.set_num_threads(per_lane)  # on each lane's own thread: its kernels' threads
            while True:
                with taking:
                    item = None if failed else next(todo, None)
                if item is None:
                    return
                i, (group, batch) = item
                try:
                    one(computer, group, batch)
                except BaseException as e:  # noqa: BLE001 -- raised below, in batch order
                    with taking:
                        failed[i] = e
                    return

        try:
            compute_thread.in_lanes([partial(lane, c) for c in [self, *self._lane_computers]])
        finally:
            torch.set_num_threads(threads)
        if failed:
            raise failed[min(failed)]

    def _checked_phi(self, loaded: LoadedRows, group: list[int], batch: Any) -> dict:
        """phi_batch of the batch `group` of `loaded`, its errors naming its rows."""
        try:
            alone = partial(self._failing_alone, loaded, group)
            with _naming_rows(loaded.row_ids, group, "compute the loss of", loaded.source, alone):
                blocks = self.phi_batch(batch)
        except BadTokensError as e:
            rows = [int(loaded.row_ids[group[j]]) for j in e.positions]
            keys = [loaded.keys[group[j]] for j in e.positions]
            raise BadTokensError(
                f"{loaded.source} {listed(rows)} (keys {listed(keys)}): {e}", e.positions
            ) from None
        except NonFiniteLossError as e:
            bad = [int(loaded.row_ids[group[j]]) for j in e.positions]
            raise NonFiniteLossError(
                f"non-finite loss (NaN or inf) for {loaded.source} {listed(bad)} "
                f"({len(bad)} of a batch of {len(group)}): their gradients would be "
                f"meaningless. Check the model's output and the labels on these examples "
                f"(NaN/inf inputs or outputs, labels out of range, or a diverged checkpoint)",
                bad,
            ) from None
        for name, block in blocks.items():
            if not all_finite(block):
                bad = sorted(int(loaded.row_ids[j]) for j in group)
                raise NonFiniteGradientError(
                    f"non-finite gradients in layer {name!r} for {loaded.source} "
                    f"{bad[0]}..{bad[-1]} (a batch of {len(bad)}): check the model's loss "
                    f"on these examples (NaN/inf inputs or labels, or a diverged checkpoint)"
                )
        return blocks


def _lane_copies(model: nn.Module, lanes: int) -> list[nn.Module]:
    """lanes - 1 copies of `model`'s modules whose parameters and buffers are `model`'s own;
    none (one lane) for a model that cannot be copied."""
    copies = []
    for _ in range(lanes - 1):
        shared = itertools.chain(model.parameters(), model.buffers())
        try:
            copies.append(copy.deepcopy(model, memo={id(t): t for t in shared}))
        except Exception as e:  # noqa: BLE001 -- whatever a model's attributes refuse
            log.info(
                "computing one batch at a time: %s cannot be copied (%s)", type(model).__name__, e
            )
            return []
    return copies


@contextmanager
def _naming_rows(
    row_ids: Sequence[int],
    group: list[int],
    doing: str,
    source: str = "rows",
    alone: Callable[[], list[int]] | None = None,
) -> Iterator[None]:
    """Turn the task's or model's own error on the batch `group` (positions in `row_ids`: a
    label out of range, rows of other shapes) into a BadRowsError that names its rows: the
    ones that fail on their own (`alone()`, positions), where some but not all do, else
    the batch; a GrassError, or running out of memory, passes unchanged."""
    try:
        yield
    except GrassError:
        raise
    except torch.OutOfMemoryError:
        raise
    except (IndexError, KeyError, TypeError, ValueError, RuntimeError) as e:
        said = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else ""
        failing = alone() if alone is not None else []
        if 0 < len(failing) < len(group):
            bad = sorted(int(row_ids[j]) for j in failing)
            raise BadRowsError(
                f"could not {doing} {source} {listed(bad)} ({len(bad)} of a batch of "
                f"{len(group)}, each failing on its own): {type(e).__name__}: {said}. Check "
                "these rows against the model and the task (shapes and types like row 0's, "
                "labels within the model's classes)"
            ) from e
        rows = [int(row_ids[j]) for j in group]  # only on failure: off the per-batch path
        first, last = min(rows), max(rows)
        which = f"{first}..{last}" if rows == list(range(first, last + 1)) else None
        entries = f"; its entry i is row {first}+i" if which else ""
        raise BadRowsError(
            f"could not {doing} {source} {which or listed(sorted(rows))} (a batch of {len(rows)}"
            f"{entries}): {type(e).__name__}: {said}. Check these rows against the model and "
            "the task (shapes and types like row 0's, labels within the model's classes)"
        ) from e
