"""Linear layers' GEMMs through oneDNN on the CPU, inside `activation_gradients`.

PyTorch runs a float32 CPU matrix multiply through its BLAS (MKL in the x86 wheels), which
on this project's AMD EPYC machines reached 109-112 GFLOP/s at one thread on an index
batch's shapes (512 tokens against weights of 256 x 256 to 8192 x 256). oneDNN, which
PyTorch ships as well, ran the same products at 205-250 GFLOP/s, in float32, its results
agreeing with MKL's to float rounding. Its matrix multiply with a bias is reachable as
`torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")`: x (..., in) times a
weight (out, in) given as any strided view (a transpose needs no copy).

Inside `activation_gradients` a layer of torch's `nn.Linear` or transformers' `Conv1D` whose
weight has at least `MIN_WEIGHT` entries computes its forward product and, in the backward,
its input's gradient there (`linear_forward`). Its weight and bias get no gradient on this
path: the capture never asks for one (the fused LM head leaves its weight none the same
way, tasks/lm_head.py). Smaller layers keep PyTorch's products (a oneDNN call costs about
10 us more; which path a layer takes depends on its weight's shape alone, never on a
batch). The fused LM head's two products use `linear`. An index batch of the bergson
benchmark's GPT-2 took 76.2 ms on one thread against 128.4 ms with PyTorch's products
(`python bench/bench_fast_paths.py --docs 32 --rounds 3 --threads 1`,
bench/results/vs_bergson.md).

The op is used only on x86-64, in a torch that has it, and where it agrees with `F.linear`
on a small check at first use; anywhere else (another device or dtype, another CPU
architecture, or GRASS_DIST_ONEDNN=0 in the environment) PyTorch's products run.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MIN_WEIGHT = 1 << 14  # entries, e.g. 128 x 128

_lock = threading.Lock()
_found: list[Any] = []  # [the op, or None], once checked
_pytorch = [False]  # set by `pytorch_gemms`


def _op() -> Any:
    """oneDNN's linear op where this process may use it, else None (checked once)."""
    if _pytorch[0]:
        return None
    if not _found:
        with _lock:
            if not _found:
                _found.append(_checked_op())
    return _found[0]


def _checked_op() -> Any:
    if os.environ.get("GRASS_DIST_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # measured on x86-64 only; elsewhere oneDNN runs through other backends
    try:
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(9, 33, generator=gen), torch.randn(17, 33, generator=gen)
        b = torch.randn(17, generator=gen)
        got = op(x, w.t().contiguous().t(), b, "none", [], "")
        same = torch.allclose(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    except (AttributeError, RuntimeError) as e:
        log.debug("oneDNN's linear op is not usable here (%s): PyTorch's GEMMs run", e)
        return None
    if not same:
        log.warning("oneDNN's linear op disagrees with F.linear here: PyTorch's GEMMs run")
        return None
    return op


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ weight.T + bias for a weight (out, in) (any strided view), through
    oneDNN where it is usable, else `F.linear`. No autograd: for tensors that need none."""
    op = _op() if _usable(x, weight) else None
    if op is None:
        return F.linear(x, weight, bias)
    return op(x, weight, bias, "none", [], "")


class _Linear(torch.autograd.Function):
    """(x, a layer's weight, its bias or None, whether the weight is stored (in, out) as
    Conv1D's is) -> x @ W.T + bias with W its (out, in) form. The gradient flows to x only;
    the output requires grad where the weight does, as the layer's own output would."""

    @staticmethod
    def forward(ctx, x, weight, bias, stored_in_out):
        weight = weight.t() if stored_in_out else weight
        ctx.save_for_backward(weight)
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = linear(grad, weight.t()) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def routed(module: nn.Module) -> bool:
    """Whether `module` is a layer whose products `linear_forward` routes: an nn.Linear or
    a transformers Conv1D (exactly those classes, whose forward is known), with a weight of
    MIN_WEIGHT entries or more."""
    kind = (type(module).__module__, type(module).__name__)
    if type(module) is not nn.Linear and kind != ("transformers.pytorch_utils", "Conv1D"):
        return False
    weight = getattr(module, "weight", None)
    return torch.is_tensor(weight) and weight.dim() == 2 and weight.numel() >= MIN_WEIGHT


def linear_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward of `module` (`routed`) with its products through oneDNN where usable,
    its own forward elsewhere."""
    own = type(module).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        if not _usable(x, weight) or _op() is None:
            return own(module, x)
        return _Linear.apply(x, weight, module.bias, not isinstance(module, nn.Linear))

    return forward


@contextmanager
def pytorch_gemms() -> Iterator[None]:
    """Inside the block, on every thread, PyTorch's products run (to compare, as bench/ does)."""
    kept, _pytorch[0] = _pytorch[0], True
    try:
        yield
    finally:
        _pytorch[0] = kept


def available() -> bool:
    """Whether this process routes products through oneDNN (checking on first call)."""
    return _op() is not None
