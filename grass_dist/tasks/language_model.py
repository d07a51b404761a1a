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

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from grass_dist.errors import BadRequestError, BadTokensError, ConfigError
from grass_dist.gradients.fast_paths import activation_gradients_only
from grass_dist.service.codec import decode_tokens
from grass_dist.tasks.lm_head import IGNORE, head_losses

REDUCTIONS = ("sum", "mean")
_ITEMS = (
    "items {'input_ids': 1-D int64 tensor, 'labels': the same or -100 where a token carries "
    "no loss} (labels default to input_ids), or 1-D token-id tensors or lists; "
    "grass_dist.data.text.TextDataset and grass_dist.data.prompts.PromptDataset build them "
    "from text"
)
_CONTEXT_FIELDS = ("n_positions", "max_position_embeddings")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _row(item: Any) -> dict[str, torch.Tensor]:
    """An item as {"input_ids", "labels"}: 1-D int64 tensors of one length."""
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ConfigError(f"task causal_lm: an item has keys {sorted(item)}; it takes {_ITEMS}")
        ids, labels = item["input_ids"], item.get("labels", item["input_ids"])
    elif isinstance(item, str | bytes):
        raise ConfigError(f"task causal_lm: an item is text ({item[:30]!r}); it takes {_ITEMS}")
    else:
        ids = labels = item
    try:
        ids, labels = torch.as_tensor(ids), torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(
            f"task causal_lm: an item is not token ids ({e}); it takes {_ITEMS}"
        ) from None
    if ids.dim() != 1 or ids.shape != labels.shape or ids.is_floating_point():
        raise ConfigError(
            f"task causal_lm: an item has input_ids of shape {tuple(ids.shape)} and dtype "
            f"{ids.dtype}, labels of shape {tuple(labels.shape)}; it takes {_ITEMS}"
        )
    if len(ids) < 2:
        raise ConfigError(
            f"task causal_lm: an item has {len(ids)} token(s); a row needs at least 2 (a "
            f"context and a target): leave out empty documents"
        )
    return {"input_ids": ids.long(), "labels": labels.long()}


def _describe(tokenizer: Any) -> str:
    spec = tokenizer.spec() if hasattr(tokenizer, "spec") else {}
    if spec.get("kind") == "bytes":
        return "the UTF-8 byte tokenizer ('bytes')"
    return f"the tokenizer in {spec.get('path', type(tokenizer).__name__)}"


def _same_tokenizer(tokenizer: Any, saved: str) -> bool:
    """Whether `tokenizer` (a grass_dist tokenizer) maps text to the ids of the one in `saved`."""
    from grass_dist.data.tokenizer import load_tokenizer

    vocab = getattr(tokenizer, "vocab", None)
    if vocab is None:
        return False
    return vocab() == load_tokenizer(saved).vocab()


def context_length(model: nn.Module) -> tuple[str, int] | None:
    """(config field, positions) of the model's context window where it is a hard limit: the
    config states one and the model learns a position embedding of that many rows (GPT-2's
    `wpe`), so a longer row cannot be computed. Rotary or relative positions have no such
    table and are left to the model."""
    config = getattr(model, "config", None)
    field = next((f for f in _CONTEXT_FIELDS if isinstance(getattr(config, f, None), int)), None)
    if field is None:
        return None
    positions = getattr(config, field)
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    learned = any(
        isinstance(m, nn.Embedding) and m is not inputs and m.num_embeddings == positions
        for m in model.modules()
    )
    return (f"config.{field}", positions) if learned else None


def saved_tokenizer(model: nn.Module) -> str | None:
    """The local directory a model was loaded from, where a tokenizer was saved with it."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not (isinstance(path, str) and path and os.path.isdir(path)):
        return None
    return path if any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES) else None


class CausalLMTask:
    """Items are {"input_ids": (L,), "labels": (L,)}; batches are right-padded dicts."""

    def __init__(
        self, reduction: str = "sum", batch_tokens: int | None = 4096, fused_head: bool = True
    ):
        if reduction not in REDUCTIONS:
            raise ConfigError(f"task.reduction={reduction!r}; choose one of {list(REDUCTIONS)}")
        if batch_tokens is not None and batch_tokens <= 0:
            raise ConfigError(f"task.batch_tokens={batch_tokens} must be positive or null")
        if not isinstance(fused_head, bool):
            raise ConfigError(f"task.fused_head={fused_head!r} must be true or false")
        self.reduction = reduction
        self.batch_tokens = batch_tokens
        self.fused_head = fused_head

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        """Right-pads to the longest item: input_ids, labels (IGNORE on padding) and
        attention_mask, each (B, T) int64."""
        items = [_row(it) for it in items]
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
        widths = [len(_row(it)["input_ids"]) for it in items]
        order = sorted(range(len(items)), key=lambda j: (widths[j], j))
        groups: list[list[int]] = []
        for j in order:
            width = widths[j]  # ascending, so the newest item is the widest
            group = groups[-1] if groups else None
            fits = group is not None and len(group) < max_rows
            if fits and self.batch_tokens is not None:
                fits = (len(group) + 1) * width <= self.batch_tokens
            if fits:
                group.append(j)
            else:
                groups.append([j])
        return groups

    def check_data(self, model: nn.Module, dataset: Any, which: str) -> None:
        """Refuse, before anything is computed, data the model cannot take or would misread:
        rows allowed to be longer than the model's context, or text tokenised with another
        tokenizer than the one saved with the model (its ids would name other tokens)."""
        context = context_length(model)
        longest = getattr(dataset, "max_length", None)
        if context is not None and isinstance(longest, int) and longest > context[1]:
            raise ConfigError(
                f"data.{which}.max_length={longest} is longer than the model's context of "
                f"{context[1]} positions ({context[0]}): set data.{which}.max_length="
                f"{context[1]} or less (longer training documents are cut or split: "
                "data.train.long)"
            )
        ours, theirs = getattr(dataset, "tokenizer", None), saved_tokenizer(model)
        if ours is None or theirs is None or _same_tokenizer(ours, theirs):
            return
        raise ConfigError(
            f"data.{which} is tokenised with {_describe(ours)}, but the model was saved with "
            f"its own tokenizer in {theirs}: its token ids would name other tokens to the "
            f"model, and every score would be wrong. Fix: set data.{which}.tokenizer={theirs}"
        )

    def to(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in batch.items()}

    def token_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T - 1) float32 loss of predicting token t + 1; 0 where the label is ignored."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if not callable(getattr(model, "get_input_embeddings", None)):
            raise ConfigError(
                f"task causal_lm needs a transformers causal LM (AutoModelForCausalLM: "
                f"get_input_embeddings(), output .logits); the model is a {type(model).__name__}"
            )
        vocab = model.get_input_embeddings().num_embeddings
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            positions = ((ids < 0) | (ids >= vocab)).any(1).nonzero().flatten().tolist()
            raise BadTokensError(
                f"token id {low if low < 0 else high} is outside the model's vocabulary of "
                f"{vocab} (ids 0 to {vocab - 1}): the data's tokenizer does not match the "
                f"model; use the model's tokenizer",
                positions,
            )
        # The module walk only for a batch wider than the config's positions (rare).
        config = getattr(model, "config", None)
        stated = [getattr(config, f, None) for f in _CONTEXT_FIELDS]
        wide = any(isinstance(n, int) and ids.shape[1] > n for n in stated)
        context = context_length(model) if wide else None
        if context is not None and ids.shape[1] > context[1]:
            raise ConfigError(
                f"a row has {ids.shape[1]} tokens, more than the model's context of "
                f"{context[1]} positions ({context[0]}): set data.train.max_length (and "
                f"data.query.max_length) to {context[1]} or less"
            )
        # Positions count real tokens only, so they are right under left padding too.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Position t predicts token t + 1; the last position predicts nothing. Its logits
        # are computed but ignored: slicing them off would copy the (B, T, V) logits, and
        # the loss over a contiguous (B T, V) view is several times faster than over the
        # (B, V, T) transpose.
        targets = torch.full_like(ids, IGNORE)
        targets[:, :-1] = batch["labels"][:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)

        def call() -> Any:
            kwargs = {"attention_mask": mask, "position_ids": positions, "use_cache": False}
            return model(input_ids=ids, **kwargs)

        fused = self.fused_head and activation_gradients_only() and isinstance(model, nn.Module)
        out, losses = head_losses(model, call, targets) if fused else (call(), None)
        logits = getattr(out, "logits", out)
        if not torch.is_tensor(logits):
            raise ConfigError(
                f"the model's output ({type(out).__name__}) has no logits: task causal_lm "
                f"needs a causal LM whose output has .logits (B, T, vocab), e.g. "
                f"AutoModelForCausalLM rather than AutoModel"
            )
        b, t = ids.shape
        if losses is None:
            losses = F.cross_entropy(
                logits.reshape(b * t, logits.shape[-1]).float(),
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

    def decode_example(self, example: Any, template: Any) -> dict[str, torch.Tensor]:
        """A request example {"input_ids": [token ids], "labels": [the same, or -100 where a
        token carries no loss]} (labels optional: default input_ids) -> an item; any length
        (`template` is unused: a training row's length says nothing of a query's). Raises
        BadRequestError (422) naming the field."""
        fields = {"input_ids", "labels"}
        if not isinstance(example, Mapping) or "input_ids" not in example or set(example) - fields:
            got = sorted(example) if isinstance(example, Mapping) else type(example).__name__
            raise BadRequestError(
                f"an example is an object with the fields ['input_ids'] and optionally "
                f"['labels'] (token ids; labels -100 where a token carries no loss), got {got}"
            )
        ids = decode_tokens(example["input_ids"], "input_ids")
        labels = decode_tokens(example.get("labels", example["input_ids"]), "labels")
        if len(labels) != len(ids):
            raise BadRequestError(f"labels: {len(labels)} of them for {len(ids)} input_ids", 422)
        if len(ids) < 2:
            raise BadRequestError(
                f"input_ids: {len(ids)} token(s); an example needs at least 2 (a context and a "
                "target)",
                422,
            )
        if not (labels[1:] != IGNORE).any():
            raise BadRequestError(
                "labels: no token after the first has a label other than -100, so the example "
                "has no loss and every score would be 0",
                422,
            )
        return {"input_ids": ids, "labels": labels}

    def spec(self) -> dict[str, Any]:
        return {"task": "causal_lm", "loss": f"next_token_cross_entropy_{self.reduction}"}


def causal_lm(
    reduction: str = "sum", batch_tokens: int | None = 4096, fused_head: bool = True
) -> CausalLMTask:
    """Hydra target of task=causal_lm."""
    return CausalLMTask(reduction, batch_tokens, fused_head)
