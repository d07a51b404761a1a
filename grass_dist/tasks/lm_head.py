"""A causal LM's output head and next-token loss in one pass, for activation gradients.

The usual path materialises the (N, V) logits, their log-softmax, and in the backward
pass a zero-filled (N, V) gradient scattered into, then the log-softmax's backward,
several passes over the largest tensors of the step. Where only gradients with respect to
activations are wanted (`grass_dist.gradients.fast_paths.activation_gradients`), the
loss's gradient with respect to the head's input is formed in the forward instead, in
chunks of rows:

    loss_i = logsumexp(z_i) - z_i[t_i],    dloss_i/dh_i = (softmax(z_i) - onehot(t_i)) W

with z = h W^T + b: the same GEMMs as the usual forward and backward, the max, exp and sum
over each chunk of logits (the softmax's normalising and the one-hot act on the (N, d)
product instead: (exp(z - max) W) / sum - W[t]), and an (N, d) result kept for the
backward rather than (N, V) ones. On the CPU the two products run through oneDNN
(`grass_dist.gradients.dnn_linear`). On one CPU thread the max, exp and sum are one C loop
(`grass_dist.gradients.native.exp_rows_`). The head's weight gets no gradient on this path (it is
never asked for there).

It applies only to a model whose logits are exactly its output embedding (a plain
`nn.Linear`) applied to what the model passes it: checked on the model's first call
inside activation_gradients by watching the head (that call computes the logits as well,
once), and on every later call by the model handing back what the head returned. Every
batch of a model takes the same path, so a row's gradient does not depend on which batch
came first. A head with hooks (a captured `lm_head`, or a global module hook) keeps the
usual path.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from grass_dist.errors import ConfigError
from grass_dist.gradients.dnn_linear import linear
from grass_dist.gradients.native import exp_rows_

IGNORE = -100
_CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in float32

# model -> (its head, whether its logits are the head's output unchanged)
_checked: weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, bool]] = weakref.WeakKeyDictionary()


class _HeadLoss(torch.autograd.Function):
    """(h (N, d), weight (V, d), bias (V,) or None, targets (N,)) -> losses (N,) float32,
    0 where the target is IGNORE; the gradient flows to h only."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets):
        n, vocab = h.shape[0], weight.shape[0]
        losses = torch.zeros(n, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        chunk = max(1, _CHUNK_ELEMENTS // vocab)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            t = targets[lo:hi]
            valid = t != IGNORE
            t = t.clamp(min=0)
            logits = linear(h[lo:hi], weight, bias).float()
            picked = logits.gather(1, t[:, None])
            top, total = exp_rows_(logits)  # in place: one (rows, V) buffer per chunk
            scores = logits
            losses[lo:hi] = torch.where(valid, (top + total.log() - picked).squeeze(1), 0.0)
            # (softmax - onehot(t)) W = (scores W) / total - W[t]: the normalising and the
            # one-hot act on the (rows, d) product, not in more passes over (rows, V).
            grad = grad_h[lo:hi]
            grad.copy_(linear(scores.to(weight.dtype), weight.t()))
            grad.div_(total.to(grad.dtype)).sub_(weight.index_select(0, t).to(grad.dtype))
            grad.mul_(valid[:, None])
        ctx.save_for_backward(grad_h)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_losses[:, None].to(grad_h.dtype)), None, None, None


def _plain_head(model: nn.Module) -> nn.Module | None:
    """The model's output embedding where it is a plain, unhooked nn.Linear, else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear or "forward" in vars(head):
        return None
    hooked = head._forward_hooks or head._forward_pre_hooks
    hooked = hooked or nn.modules.module._global_forward_hooks
    if hooked or nn.modules.module._global_forward_pre_hooks:
        return None
    return head


def _logits(out: Any) -> Any:
    return getattr(out, "logits", out)


def head_losses(
    model: nn.Module, call: Callable[[], Any], targets: torch.Tensor
) -> tuple[Any, torch.Tensor | None]:
    """Run `call()` (the model's forward on a batch whose next-token targets are the (B, T)
    `targets`) -> (its output, per-token losses (B T,) float32 from the fused head and loss),
    or (its output, None) where this model's logits are not its plain head's output: the
    caller computes the losses from the output's logits as usual. Where the losses come
    back, the output's logits are not to be used (a stand-in without values, or on the
    model's first call here, which computes them to watch the head, the usual logits)."""
    head = _plain_head(model)
    known = _checked.get(model) if head is not None else None
    if known is not None and known[0] is not head:
        known = None
    if head is None or (known is not None and not known[1]):
        return call(), None
    seen: dict[str, torch.Tensor] = {}

    def watched(h: torch.Tensor) -> torch.Tensor:
        seen["h"] = h
        if known is None:
            seen["z"] = F.linear(h, head.weight, head.bias)
        else:  # a stand-in of the logits' shape, no memory: the loss below replaces them
            seen["z"] = h.new_zeros(()).expand(*h.shape[:-1], head.weight.shape[0])
        return seen["z"]

    head.forward = watched
    try:
        out = call()
    finally:
        vars(head).pop("forward", None)
    plain = "z" in seen and _logits(out) is seen["z"]
    plain = plain and seen["h"].shape[:-1] == targets.shape
    if known is None:
        _checked[model] = (head, plain)
        if not plain:
            return out, None
    elif not plain:
        raise ConfigError(
            f"{type(model).__name__}'s logits were its output head's output on its first "
            "batch but not on a later one, so the fused head and loss (which skip the (B, T, "
            "vocab) logits) cannot be used with it. Fix: set task.fused_head=false (in "
            "Python, causal_lm(fused_head=False))"
        )
    h = seen["h"]
    losses = _HeadLoss.apply(
        h.reshape(-1, h.shape[-1]), head.weight.detach(), _detached(head.bias), targets.flatten()
    )
    return out, losses


def _detached(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach()
