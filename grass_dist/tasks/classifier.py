"""Tasks define the per-sample loss whose gradient is attributed.

A task turns a collated batch into per-sample losses (B,). The sum of those losses is
differentiated, so each sample's gradient is exactly its own (no batch-mean 1/B).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data._utils.collate import collate, default_collate_fn_map

from grass_dist.service.codec import decode_like

_NO_IGNORE = torch.iinfo(torch.int64).min  # a label no dataset holds

# Field names of dict items, in order of preference (grass_dist.data.items reads them too).
INPUT_FIELDS = ("input", "inputs", "x", "image", "pixel_values")
LABEL_FIELDS = ("label", "labels", "y", "target")


def _pick(batch: dict, keys: tuple[str, ...], what: str) -> Any:
    for k in keys:
        if k in batch:
            return batch[k]
    hint = (
        " (token ids: a language model's items, which the causal_lm task takes: task=causal_lm "
        "on the command line; in Python task=causal_lm() from grass_dist.tasks_lm)"
        if "input_ids" in batch
        else ""
    )
    raise KeyError(
        f"dataset items are dicts without an {what} field: expected one of {keys}, "
        f"got {sorted(batch)}{hint}"
    )


def _stack_arrays(batch: list[np.ndarray], *, collate_fn_map=None) -> torch.Tensor:
    """Numeric arrays -> one tensor, stacked by numpy first: rows that reach a worker
    through Ray are read-only views, which torch.as_tensor warns about row by row."""
    if batch[0].dtype.kind in "OSUV":  # torch's own error for strings and objects
        return default_collate_fn_map[np.ndarray](batch, collate_fn_map=collate_fn_map)
    return torch.as_tensor(np.stack(batch))


_COLLATE_FNS = {**default_collate_fn_map, np.ndarray: _stack_arrays}


def default_collate(items: list) -> Any:
    """torch's default_collate (tuples, dicts, tensors, numbers), numpy rows stacked."""
    return collate(items, collate_fn_map=_COLLATE_FNS)


def class_ids(labels: Any) -> torch.Tensor:
    """A batch's labels as int64 class ids. ValueError for labels that are none: a label
    that is not a whole number (a regression target: `.long()` would cut 0.7 to 0 without
    a word) or a vector per row (one-hot or class probabilities)."""
    if isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], str):
        raise ValueError(
            f"the labels are strings ({labels[0]!r}): the classification task takes class "
            f"ids, integers 0..C-1 in the model's output order; map each class name to its id"
        )
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(
            f"the labels of a batch have shape {list(labels.shape)}, not one class id per row "
            f"(one-hot or probability vectors?): the classification task takes class ids; "
            f"for other targets give your own task (task._target_)"
        )
    if labels.is_floating_point():
        fraction = labels != labels.round()  # NaN included
        if fraction.any():
            raise ValueError(
                f"label {labels[fraction][0].item():g} is not a whole number: the "
                f"classification task takes class ids (a regression target needs a task of "
                f"your own, e.g. a squared-error loss: task._target_)"
            )
    return labels.long()


class ClassificationTask:
    """Cross-entropy of the true label; items are (input, label) pairs or dicts."""

    def collate(self, items: list) -> Any:
        first = items[0]
        if isinstance(first, list) and len(first) != 2 and all(isinstance(t, int) for t in first):
            raise TypeError(
                f"the items are lists of {len(first)} integers, not (input, label) pairs: "
                f"token ids? A language model's items take the causal_lm task: task=causal_lm "
                f"on the command line; in Python task=causal_lm() from grass_dist.tasks_lm"
            )
        return default_collate(items)

    def split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated batch -> (inputs, labels)."""
        if isinstance(batch, dict):
            return _pick(batch, INPUT_FIELDS, "input"), _pick(batch, LABEL_FIELDS, "label")
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:  # e.g. bare input tensors
            kind = type(batch).__name__
            kind += f" of {len(batch)}" if isinstance(batch, (list, tuple)) else ""
            whole = (
                " (rows of one array or tensor: give inputs and labels as "
                "TensorDataset(inputs, labels))"
                if torch.is_tensor(batch)
                else ""
            )
            raise TypeError(
                f"the items are not (input, label) pairs or dicts with input and label keys "
                f"(a batch of them collates to a {kind}){whole}: the classification task needs "
                f"a label per row; for items without labels give your own task (task._target_)"
            )
        inputs, labels = batch[0], batch[1]
        return inputs, labels

    def to(self, batch: Any, device: torch.device) -> Any:
        if torch.is_tensor(batch):  # items without labels (split says so)
            return batch.to(device)
        if isinstance(batch, dict):
            return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        return [v.to(device) if torch.is_tensor(v) else v for v in batch]

    def logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model's logits of the batch: its output, or that output's `logits` field (a
        dict, or a Hugging Face ModelOutput)."""
        inputs, _ = self.split(batch)
        out = model(inputs)
        if torch.is_tensor(out):
            return out
        found = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
        if torch.is_tensor(found):
            return found
        raise TypeError(
            f"the model returned a {type(out).__name__}, neither a tensor of logits nor an "
            f"output with a 'logits' field: the classification task needs the logits; for "
            f"other outputs give your own task (task._target_)"
        )

    def per_sample_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """(B,) cross-entropy losses, float32."""
        _, labels = self.split(batch)
        # No label is "ignored": cross_entropy's default would give -100 a zero loss and
        # gradient, so it is out of bounds like any other label outside the classes.
        return F.cross_entropy(
            self.logits(model, batch).float(),
            class_ids(labels),
            reduction="none",
            ignore_index=_NO_IGNORE,
        )

    def predict(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """(B,) predicted class ids."""
        with torch.no_grad():
            return self.logits(model, batch).argmax(-1)

    def decode_example(self, example: Any, template: Any) -> Any:
        """A request example -> an item `collate` accepts, shaped like the training item
        `template` (grass_dist.service.codec.decode_like)."""
        return decode_like(example, template)

    def spec(self) -> dict[str, Any]:
        return {"task": "classification", "loss": "cross_entropy_sum"}


def classification() -> ClassificationTask:
    """Hydra target for the default task."""
    return ClassificationTask()
