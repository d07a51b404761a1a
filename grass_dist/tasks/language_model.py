"""The causal-LM task: a sample's loss is the sum (or mean) of its next-token losses.

Only tokens with a label other than -100 count, and padding never does. Padding is on the
right, after a sample's tokens, and the model is causal, so padding changes neither a
sample's loss nor its gradient factors (dL/dy is exactly 0 on padding tokens): a
sample's compressed gradient does not depend on the batch it is padded into.
The default is the sum: it is exactly the sample's own log-likelihood gradient, and
per-token scores of a query add up to the whole query's. `mean` divides by the sample's
number of target tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from grass_dist.errors import ConfigError

IGNORE = -100
REDUCTIONS = ("sum", "mean")


class CausalLMTask:
    """Items are {"input_ids": (L,), "labels": (L,)}; batches are right-padded dicts."""

    def __init__(self, reduction: str = "sum", batch_tokens: int | None = 4096):
        if reduction not in REDUCTIONS:
            raise ConfigError(f"task.reduction={reduction!r}; choose one of {list(REDUCTIONS)}")
        if batch_tokens is not None and batch_tokens <= 0:
            raise ConfigError(f"task.batch_tokens={batch_tokens} must be positive or null")
        self.reduction = reduction
        self.batch_tokens = batch_tokens

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pads to the longest item: input_ids, labels (IGNORE on padding) and
        attention_mask, each (B, T) int64."""
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.zeros(len(items), width, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            ids[b, :n], labels[b, :n], mask[b, :n] = it["input_ids"], it["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    def plan_batches(self, items: list[dict[str, torch.Tensor]], max_rows: int) -> list[list[int]]:
        """Positions of `items` grouped by length, each group at most `max_rows` items and,
        padded, about `batch_tokens` tokens (a longer single item is a batch of its own)."""
        order = sorted(range(len(items)), key=lambda j: (len(items[j]["input_ids"]), j))
        groups: list[list[int]] = []
        for j in order:
            width = len(items[j]["input_ids"])  # ascending, so the newest item is the widest
            group = groups[-1] if groups else None
            fits = group is not None and len(group) < max_rows
            if fits and self.batch_tokens is not None:
                fits = (len(group) + 1) * width <= self.batch_tokens
            if fits:
                group.append(j)
            else:
                groups.append([j])
        return groups

    def to(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in batch.items()}

    def token_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T - 1) float32 loss of predicting token t + 1; 0 where the label is ignored."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        vocab = model.get_input_embeddings().num_embeddings
        if int(ids.max()) >= vocab:
            raise ConfigError(
                f"token id {int(ids.max())} is outside the model's vocabulary of {vocab}: the "
                f"data's tokenizer does not match the model; use the model's tokenizer"
            )
        # Positions count real tokens only, so they are right under left padding too.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        logits = getattr(out, "logits", out)
        # Position t predicts token t + 1; the last position predicts nothing. Its logits
        # are computed but ignored: slicing them off would copy the (B, T, V) logits, and
        # the loss over a contiguous (B T, V) view is several times faster than over the
        # (B, V, T) transpose.
        targets = torch.full_like(ids, IGNORE)
        targets[:, :-1] = batch["labels"][:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
        b, t, v = logits.shape
        losses = F.cross_entropy(
            logits.reshape(b * t, v).float(),
            targets.reshape(b * t),
            ignore_index=IGNORE,
            reduction="none",
        )
        return losses.view(b, t)[:, :-1]

    def per_sample_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) float32: sum (or mean) over each sample's target tokens."""
        losses = self.token_losses(model, batch)
        total = losses.sum(1)
        if self.reduction == "sum":
            return total
        counts = (batch["labels"][:, 1:] != IGNORE) & (batch["attention_mask"][:, 1:] != 0)
        return total / counts.sum(1).clamp(min=1)

    def spec(self) -> dict[str, Any]:
        return {"task": "causal_lm", "loss": f"next_token_cross_entropy_{self.reduction}"}


def causal_lm(reduction: str = "sum", batch_tokens: int | None = 4096) -> CausalLMTask:
    """Hydra target of task=causal_lm."""
    return CausalLMTask(reduction, batch_tokens)
