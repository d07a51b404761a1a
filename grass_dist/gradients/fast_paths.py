"""Faster ways to run a model where only gradients with respect to activations are wanted.

The capture (capture.py) differentiates the loss with respect to layer outputs, never with
respect to parameters. Inside `activation_gradients(model)` two things hold:

- `activation_gradients_only()` is True on this thread, so a task may compute its loss on
  a path whose gradients with respect to activations are exact but which gives parameters
  none (the causal-LM task's fused head and loss, `grass_dist.tasks.lm_head`). A task
  that trains a model calls its loss outside, and is never given such a path.
- modules known to compute the same function as one of PyTorch's fused kernels run as that
  kernel: transformers' `NewGELUActivation` (GPT-2's `gelu_new`), six elementwise Python
  ops forward and more backward, is `F.gelu(x, approximate="tanh")`, the same formula in
  one kernel each way (the two agree to float rounding). The swap is on the module
  instances for the block only: the user's model is left as it was. On a one-thread CPU
  batch the kernel is our own C loop (`native`), which forms the derivative in the
  forward: about a third of PyTorch's kernel's time, each way.
- Linear layers (torch's nn.Linear, transformers' Conv1D) of 128 x 128 entries or more run
  their forward product and their input's gradient through oneDNN on the CPU, about twice
  as fast as PyTorch's BLAS on AMD EPYC machines (`dnn_linear`); their parameters get no
  gradient there.
- transformers' "sdpa" causal self-attention on the CPU runs in blocks of query rows, each
  attending only to the keys up to its last row (`causal_attention`): PyTorch's CPU kernel
  computes the masked half of the scores in its backward.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from grass_dist.gradients import dnn_linear
from grass_dist.gradients.native import gelu_tanh

_state = threading.local()

# (module, class name) of modules whose forward is one of PyTorch's fused kernels -> it.
_SAME_AS_FUSED = {("transformers.activations", "NewGELUActivation"): gelu_tanh}


def activation_gradients_only() -> bool:
    """Whether this thread is inside `activation_gradients`: only gradients with respect to
    activations are wanted, so a loss may take a path that gives parameters none."""
    return getattr(_state, "depth", 0) > 0


def fusable_modules(model: nn.Module) -> list[tuple[nn.Module, Callable]]:
    """(module, its fused kernel) for each module of `model` that runs as a fused kernel inside
    `activation_gradients` (its class is listed and it has no forward of its own set). A model
    with transformers' "sdpa" attention also gets its causal self-attention in blocks of
    query rows there (`causal_attention`); its Linear layers but the output head (which the
    fused head computes) run their products through oneDNN (`dnn_linear`)."""
    from grass_dist.gradients import causal_attention  # it imports this module

    causal_attention.install(model)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    found = []
    for module in model.modules():
        if "forward" in vars(module):
            continue
        kernel = _SAME_AS_FUSED.get((type(module).__module__, type(module).__name__))
        if kernel is None and module is not head and dnn_linear.routed(module):
            kernel = dnn_linear.linear_forward(module)
        if kernel is not None:
            found.append((module, kernel))
    return found


@contextmanager
def activation_gradients(modules: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """The block computes only gradients with respect to activations: `modules` (from
    `fusable_modules`) run as their fused kernels and `activation_gradients_only()` is True.
    A block inside another leaves the outer block's swaps in place as it exits."""
    swapped = [(m, k) for m, k in modules if "forward" not in vars(m)]
    for module, kernel in swapped:
        module.forward = kernel
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
        for module, _ in swapped:
            vars(module).pop("forward", None)
