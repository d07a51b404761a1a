"""Which layers are attributed, and per-sample gradient factors of the Linear ones.

Forward hooks keep each layer's input x and output y; `torch.autograd.grad` of the summed
per-sample losses with respect to the outputs y yields g = dL/dy. Since no parameter is a
differentiation target, autograd skips every weight-gradient GEMM.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from grass_dist.compress.base import FlatShape, LayerShape, LinearShape
from grass_dist.errors import ConfigError

log = logging.getLogger(__name__)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, or transformers' GPT-2 Conv1D (a Linear with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_shape(module: nn.Module) -> LinearShape:
    """The gradient shape of an nn.Linear or a GPT-2 style Conv1D."""
    if isinstance(module, nn.Linear):
        d_out, d_in = module.weight.shape
    else:
        d_in, d_out = module.weight.shape
    return LinearShape(d_in=int(d_in), d_out=int(d_out), bias=module.bias is not None)


def flat_shape(module: nn.Module) -> FlatShape:
    """The flat gradient layout of any module: its parameters in `named_parameters` order."""
    params = tuple((n, tuple(p.shape)) for n, p in module.named_parameters())
    return FlatShape(kind=type(module).__name__, params=params)


def _tied_to(model: nn.Module) -> dict[str, list[str]]:
    """Linear-like layer -> the other modules holding its weight (tied embeddings)."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), []).append(name)
    return {
        name: [h for h in holders[id(module.weight)] if h != name]
        for name, module in model.named_modules()
        if is_linear_like(module) and len(holders[id(module.weight)]) > 1
    }


def resolve_layers(model: nn.Module, names: Iterable[str] | None) -> dict[str, LayerShape]:
    """Layer name -> shape for the requested modules (all untied Linear layers when None).

    Linear layers get a LinearShape (factorised capture); any other module with parameters
    gets a FlatShape (per-sample gradients through torch.func). A Linear layer whose weight
    another module also uses (an LM head tied to the embedding) is left out: the factorised
    capture would see only this layer's share of the weight's gradient.
    """
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items() if is_linear_like(m)]
    tied = _tied_to(model)
    if names is None:
        chosen = [n for n in linear if n not in tied]
        if not chosen:
            raise ConfigError(
                "the model has no nn.Linear layers to capture; set index.layers to the names "
                "of the modules to attribute (any module with parameters)"
            )
        return {n: linear_shape(modules[n]) for n in chosen}
    shapes: dict[str, LayerShape] = {}
    for name in names:
        if name not in modules:
            raise ConfigError(
                f"index.layers names {name!r}, which is not a module of the model. "
                f"Linear layers in this model: {linear}"
            )
        module = modules[name]
        if name in tied:
            raise ConfigError(
                f"index.layers names {name!r}, whose weight is shared with {tied[name]} "
                f"(tied embeddings): its captured gradient would miss the other uses. "
                f"Leave it out of index.layers or untie the weights"
            )
        if is_linear_like(module):
            shapes[name] = linear_shape(module)
        elif next(module.parameters(), None) is None:
            raise ConfigError(
                f"index.layers names {name!r}, a {type(module).__name__} without parameters; "
                f"name modules that have parameters. Linear layers in this model: {linear}"
            )
        else:
            shapes[name] = flat_shape(module)
    _shared(shapes, modules)
    return shapes


def _shared(shapes: dict[str, LayerShape], modules: dict[str, nn.Module]) -> None:
    """Refuse two chosen layers that hold the same parameters (one inside the other, or a
    weight shared between them): each parameter's gradient would be counted twice."""
    owner: dict[int, str] = {}
    for name in shapes:
        for param in modules[name].parameters():
            first = owner.setdefault(id(param), name)
            if first == name:
                continue
            how = (
                f"{name!r} lies inside {first!r}"
                if name.startswith(f"{first}.") or first.startswith(f"{name}.")
                else "they share weights"
            )
            raise ConfigError(
                f"index.layers names {first!r} and {name!r}, which hold the same parameters "
                f"({how}): their gradients would be counted twice. Name either the module "
                f"or the layers inside it"
            )


@contextmanager
def counting_calls(model: nn.Module) -> Iterator[Counter[str]]:
    """Counts each module's forward calls made inside the block, by name ("" for the
    model itself)."""
    calls: Counter[str] = Counter()
    handles = [
        module.register_forward_hook(lambda _m, _a, _o, name=name: calls.update([name]))
        for name, module in model.named_modules()
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _did_not_run(names: list[str]) -> ConfigError:
    return ConfigError(
        f"layers {names} did not run in the forward pass: leave them out of index.layers, "
        "or attribute with a model whose forward uses them"
    )


def _ran_twice(name: str) -> ConfigError:
    return ConfigError(
        f"layer {name!r} ran twice in one forward pass; shared layers are not supported by "
        f"the factorised capture. Leave it out of index.layers, or name the module that "
        f"calls it (its parameters then get per-sample gradients as a whole)."
    )


def layers_that_run(model: nn.Module, names: list[str] | None, calls: Counter[str]) -> list[str]:
    """The layers to attribute, judged by `calls` (each module's calls in one row's forward,
    `counting_calls`): `names` when each Linear-like one among them ran exactly once (the
    factorised capture needs one call: else ConfigError, as a worker would raise it later);
    for index.layers=null, the Linear layers `resolve_layers` chooses less those that do not
    run once (nn.MultiheadAttention's out_proj, whose weight it uses without calling it; a
    layer called twice), with a warning naming them and their enclosing modules."""
    if names is not None:
        shapes = resolve_layers(model, names)
        linear = [n for n in shapes if isinstance(shapes[n], LinearShape)]
        missing = [n for n in linear if calls[n] == 0]
        if missing:
            raise _did_not_run(missing)
        twice = [n for n in linear if calls[n] > 1]
        if twice:
            raise _ran_twice(twice[0])
        return list(shapes)
    chosen = list(resolve_layers(model, None))
    left = [n for n in chosen if calls[n] != 1]
    if left:
        parents = sorted({n.rpartition(".")[0] for n in left if "." in n})
        log.warning(
            "index.layers=null leaves out Linear layers that do not run exactly once as a "
            "module in the forward pass, so their inputs cannot be captured: %s (calls: %s). "
            "To attribute their weights, name their enclosing modules in index.layers%s",
            left,
            [calls[n] for n in left],
            f" (e.g. {parents})" if parents else "",
        )
    kept = [n for n in chosen if calls[n] == 1]
    _warn_left_out(model)
    if not kept:
        raise ConfigError(
            f"none of the model's Linear layers runs exactly once as a module in the forward "
            f"pass (calls: {dict((n, calls[n]) for n in chosen)}); set index.layers to the "
            f"modules to attribute (any module with parameters)"
        )
    return kept


def _warn_left_out(model: nn.Module) -> None:
    """index.layers=null attributes untied Linear layers only: warn of the layers of the
    model it leaves out that a user would expect attributed (by other tools, or as the
    layers that hold the model's weights): Linear layers with tied weights (an LM head tied
    to its embedding) and convolutions, with their share of the model's parameters and
    how to attribute them. Norms and embeddings are left out without a word, as is usual."""
    total = sum(p.numel() for p in model.parameters()) or 1
    tied = sorted(_tied_to(model))
    if tied:
        log.warning(
            "index.layers=null leaves out Linear layers whose weight another module shares "
            "(tied weights; the factorised capture would see only this layer's share of its "
            "gradient): %s",
            tied,
        )
    convs = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd) and next(m.parameters(), None) is not None
    }
    if convs:
        share = sum(p.numel() for m in convs.values() for p in m.parameters()) / total
        kinds = sorted({type(m).__name__ for m in convs.values()})
        log.warning(
            "index.layers=null attributes Linear layers only and leaves out the convolutions "
            "%s (%s, %.0f%% of the model's parameters). To attribute them, name them in "
            "index.layers together with the Linear layers (in the Python API: "
            "overrides=['index.layers=[...]']); they are compressed as whole modules "
            "(compression.other)",
            sorted(convs),
            ", ".join(kinds),
            100 * share,
        )


class LinearCapture:
    """Records inputs and outputs of the chosen layers during one forward pass."""

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model = model
        self.names = list(names)
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._modules: list[nn.Module] | None = None

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name in self.outputs:
                raise _ran_twice(name)
            self.inputs[name] = args[0].detach()
            self.outputs[name] = output

        return hook

    @contextmanager
    def recording(self) -> Iterator[LinearCapture]:
        self.inputs.clear()
        self.outputs.clear()
        if self._modules is None:  # once: a walk of every module is 0.1 ms on a small GPT-2
            named = dict(self.model.named_modules())
            self._modules = [named[n] for n in self.names]
        handles = [
            m.register_forward_hook(self._hook(n))
            for n, m in zip(self.names, self._modules, strict=True)
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def factors(self, losses: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-sample losses (B,) -> {layer: (x (B, T, d_in), g (B, T, d_out))}.

        The losses are summed, so each sample's g is its own loss's gradient (no 1/B).
        """
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise _did_not_run(missing)
        outs = [self.outputs[n] for n in self.names]
        grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True)
        result = {}
        for name, out, g in zip(self.names, outs, grads, strict=True):
            if g is None:
                g = torch.zeros_like(out)
            x = self.inputs[name]
            batch = x.shape[0]
            result[name] = (x.reshape(batch, -1, x.shape[-1]), g.reshape(batch, -1, g.shape[-1]))
        self.inputs.clear()
        self.outputs.clear()
        return result
