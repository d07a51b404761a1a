"""Selective Mask: mask logits learned so that masked inner products rank like exact ones.

Logits S (init 0.01 N(0, 1)), mask m = sigmoid(S). Adam minimises

    -mean_heldout Pearson_train(<g_h, g_i>, <m g_h, m g_i>) + lambda * sum_masks f * sum(m)

with f = max(0.1, active / (2 k')) while active <= 2 k' (else 1), active = #{m > 0.5}.
After each step, if active < k' the top-k' logits are set to 2. Training stops early once
the Spearman correlation of the soft-masked against the exact inner products (mean over
held-out rows, checked every `check_every` steps: right after the first top-k' forcing it
dips and then recovers) is below `min_spearman`. The output is, among the hard masks (top-k'
logits) seen before stopping, the one whose masked inner products rank best.

The factorised version learns one mask on g (d_out) and one on a = [x, 1] (d_in + 1);
they act inside the sum of outer products, so <M1, M2> weighs entry (r, c) by m_o[r]^2 m_i[c]^2.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from grass_dist.compress.base import LinearShape, linear_gradient, linear_inputs

log = logging.getLogger(__name__)

Inner = Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass
class FitResult:
    """Learned indices per mask and how the fit went (Spearman of the chosen hard masks)."""

    indices: list[torch.Tensor]
    epochs: int
    spearman: float


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of (n, m) matrices -> (n,)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Spearman correlation (Pearson of ranks; ties broken by position) -> (n,)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return x.argsort(1).argsort(1).to(torch.float64)

    return _pearson_rows(ranks(a), ranks(b))


def _hard(logits: list[torch.Tensor], budgets: list[int]) -> list[torch.Tensor]:
    """The sorted top-k' indices of each logit vector."""
    return [
        torch.sort(s.detach().topk(min(k, s.numel())).indices).values
        for s, k in zip(logits, budgets, strict=True)
    ]


def fit_masks(
    inner: Inner,
    dims: list[int],
    budgets: list[int],
    *,
    epochs: int,
    lr: float,
    lam: float,
    min_spearman: float,
    check_every: int,
    gen: torch.Generator,
) -> FitResult:
    """Learn one mask per entry of `dims`, keeping `budgets[j]` indices of mask j.

    `inner(weights)` maps per-mask coordinate weights (the squared masks) to the
    (n_heldout, n_train) matrix of weighted inner products. Of the hard top-k' masks seen
    along the way, the one whose inner products rank best (mean Spearman) is returned.
    """
    if all(k >= d for k, d in zip(budgets, dims, strict=True)):
        return FitResult([torch.arange(d) for d in dims], 0, 1.0)  # nothing to choose
    logits = [(0.01 * torch.randn(d, generator=gen)).requires_grad_() for d in dims]
    exact = inner([torch.ones(d) for d in dims]).detach()
    opt = torch.optim.Adam(logits, lr=lr)
    best = FitResult(_hard(logits, budgets), 0, -2.0)
    for epoch in range(epochs + 1):
        hard = _hard(logits, budgets)
        with torch.no_grad():
            picked = [
                torch.zeros(d).index_fill_(0, i, 1.0) for d, i in zip(dims, hard, strict=True)
            ]
            rho_hard = float(spearman_rows(exact, inner(picked)).mean())
        if rho_hard > best.spearman:
            best = FitResult(hard, epoch, rho_hard)
        masks = [torch.sigmoid(s) for s in logits]
        masked = inner([m * m for m in masks])
        if epoch == epochs:
            break
        check = epoch > 0 and epoch % check_every == 0
        if check and float(spearman_rows(exact, masked.detach()).mean()) < min_spearman:
            break
        penalty = sum(_sparsity_weight(m, k) * m.sum() for m, k in zip(masks, budgets, strict=True))
        loss = -_pearson_rows(exact, masked).mean() + lam * penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for s, k in zip(logits, budgets, strict=True):
                if int((s > 0).sum()) < k:
                    s[s.topk(k).indices] = 2.0
    return best


def _sparsity_weight(mask: torch.Tensor, budget: int) -> float:
    active = int((mask.detach() > 0.5).sum())
    return max(0.1, active / (2 * budget)) if active <= 2 * budget else 1.0


def flat_inner(train: torch.Tensor, heldout: torch.Tensor) -> Inner:
    """Weighted inner products of flat gradients: (n_h, p), (n_t, p) -> (n_h, n_t)."""
    train, heldout = train.float(), heldout.float()
    return lambda w: (heldout * w[0]) @ train.T


def factor_inner(
    train: tuple[torch.Tensor, torch.Tensor],
    heldout: tuple[torch.Tensor, torch.Tensor],
    shape: LinearShape,
) -> Inner:
    """Weighted inner products of Linear gradients from factors (x (n, T, d_in), g (n, T, d_out)).

    With T = 1, <M_h, M_t> = (g_h . w_o g_t)(a_h . w_i a_t) needs no gradient matrix;
    longer sequences form each sample's G (n * d_out * cols floats).
    """
    (xt, gt), (xh, gh) = train, heldout
    if xt.shape[1] == 1 and xh.shape[1] == 1:
        at = linear_inputs(xt[:, 0], shape.bias).float()
        ah = linear_inputs(xh[:, 0], shape.bias).float()
        gt, gh = gt[:, 0].float(), gh[:, 0].float()
        return lambda w: ((gh * w[0]) @ gt.T) * ((ah * w[1]) @ at.T)
    big_t = linear_gradient(xt, gt, shape).reshape(-1, shape.d_out, shape.cols)
    big_h = linear_gradient(xh, gh, shape).reshape(-1, shape.d_out, shape.cols)
    return lambda w: (big_h * w[0][:, None] * w[1][None, :]).flatten(1) @ big_t.flatten(1).T
