"""Exact per-sample gradients of non-Linear modules' parameters through `torch.func`.

`vmap(grad_and_value(loss))` differentiates each sample's own loss (the task's per-sample loss on a
batch of one) with respect to the chosen parameters only; every other parameter and buffer
is held fixed. Linear layers do not come here: their factors come from the hooks in
`capture.py` in a separate forward/backward pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from grass_dist.errors import NonFiniteLossError


class _Bound:
    """The model called with substituted parameters, looking like the model to a task."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        self._model, self._params = model, params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._model, self._params, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def check_losses(losses: torch.Tensor) -> None:
    """NonFiniteLossError naming the batch positions whose per-sample loss is NaN or inf."""
    finite = torch.isfinite(losses.detach())
    if bool(finite.all()):
        return
    bad = torch.nonzero(~finite).flatten().tolist()
    raise NonFiniteLossError(f"non-finite loss at batch positions {bad}", bad)


class FlatGradients:
    """Per-sample gradients {layer: (B, p)} of the parameters of the given modules.

    A layer's vector concatenates its parameters in `named_parameters` order, each
    flattened row-major (e.g. Conv2d: weight (C_out, C_in, kh, kw), then bias).
    """

    def __init__(self, model: nn.Module, task, layers: list[str]):
        self.model, self.task = model, task
        modules = dict(model.named_modules())
        self.params = {
            layer: [f"{layer}.{n}" if layer else n for n, _ in modules[layer].named_parameters()]
            for layer in layers
        }

    def per_sample(self, batch: Any) -> dict[str, torch.Tensor]:
        """A collated batch (already on the device) -> {layer: (B, p) float32}."""
        state = {n: p.detach() for n, p in self.model.named_parameters()}
        state.update(dict(self.model.named_buffers()))
        wanted = {n: state.pop(n) for names in self.params.values() for n in names}
        leaves, spec = tree_flatten(batch)
        where = [i for i, leaf in enumerate(leaves) if torch.is_tensor(leaf)]

        def loss(params: dict[str, torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
            items = list(leaves)
            for i, t in zip(where, tensors, strict=True):
                items[i] = t.unsqueeze(0)  # a batch of one: this sample alone
            one = tree_unflatten(items, spec)
            return self.task.per_sample_loss(_Bound(self.model, {**state, **params}), one).sum()

        tensors = [leaves[i] for i in where]
        grads, losses = vmap(grad_and_value(loss), in_dims=(None, *[0] * len(tensors)))(
            wanted, *tensors
        )
        check_losses(losses)
        batch_size = tensors[0].shape[0]
        return {
            layer: torch.cat([grads[n].reshape(batch_size, -1) for n in names], 1).float()
            for layer, names in self.params.items()
        }
