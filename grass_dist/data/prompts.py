"""Queries for a causal LM: attribute the loss of a completion given its prompt."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from grass_dist.data.records import Field, expand_paths, file_format, file_names, read_fields
from grass_dist.data.tokenizer import Tokenizer, load_tokenizer
from grass_dist.errors import BadRecordError, ConfigError

IGNORE = -100  # label of tokens that carry no loss (prompt, start token, padding)

log = logging.getLogger(__name__)


class PromptDataset(Dataset):
    """(prompt, completion) pairs as rows whose loss is the completion's alone.

    An item is {"input_ids": (L,) int64, "labels": (L,) int64}: [start] + prompt + completion,
    labels IGNORE on the start and prompt tokens. With `per_token`, every completion token
    is a row of its own (labels IGNORE elsewhere, key "<key>/t<j>"); since the task's loss
    is a sum over tokens, a pair's scores are the sum of its per-token rows' scores.
    A prompt too long for `max_length` loses its first tokens; the completion never does.
    Prompt and completion are tokenised as one text and split where the completion starts,
    so a token that spans the seam (a BPE token " word" whose space ends the prompt) is the
    completion's first token: the ids are those the model saw for such text in training.
    """

    def __init__(
        self,
        keys: Sequence[str],
        prompts: Sequence[str],
        completions: Sequence[str],
        tokenizer: Any = "bytes",
        max_length: int = 512,
        per_token: bool = False,
        add_bos: bool = True,
    ):
        if not len(keys) == len(prompts) == len(completions) or len(set(keys)) != len(keys):
            raise ConfigError("data.query needs one unique key per prompt/completion pair")
        self.tokenizer: Tokenizer = load_tokenizer(tokenizer)
        start = [self.tokenizer.bos_id] if add_bos and self.tokenizer.bos_id is not None else []
        self._pairs: list[tuple[list[int], list[int]]] = []
        self.max_length = int(max_length)
        cut: list[str] = []
        for key, prompt, completion in zip(keys, prompts, completions, strict=True):
            # Encoded as one text, as the model read such text in training.
            before, target = self.tokenizer.encode_pair(prompt, completion)
            if not 1 <= len(target) <= max_length - 1:
                raise ConfigError(
                    f"query {key!r}: the completion has {len(target)} tokens; it needs 1 to "
                    f"data.query.max_length - 1 = {max_length - 1}"
                )
            context = (start + before)[-(max_length - len(target)) :]
            if len(context) < len(start + before):
                cut.append(str(key))
            if not context:
                raise ConfigError(
                    f"query {key!r} has an empty prompt and no start token, so its first "
                    f"completion token has no context: give a prompt or data.query.add_bos=true"
                )
            self._pairs.append((context, target))
        if cut:
            log.warning(
                "data.query: %d prompt(s) lost their first tokens (and the start token) to "
                "fit data.query.max_length=%d with their completions, e.g. %s: they are scored "
                "with the shorter prompt. Raise data.query.max_length (up to the model's "
                "context) to keep them whole",
                len(cut),
                max_length,
                cut[:5],
            )
        self._rows = [
            (q, j)
            for q, (_, target) in enumerate(self._pairs)
            for j in (range(len(target)) if per_token else [None])
        ]
        self.keys = [str(keys[q]) if j is None else f"{keys[q]}/t{j}" for q, j in self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        q, j = self._rows[int(i)]
        context, target = self._pairs[q]
        ids = torch.tensor(context + target, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        if j is None:
            labels[len(context) :] = ids[len(context) :]
        else:
            labels[len(context) + j] = ids[len(context) + j]
        return {"input_ids": ids, "labels": labels}

    def describe(self, i: int) -> dict:
        """Rendering protocol of the report: the prompt with the attributed part in ⟦ ⟧."""
        q, j = self._rows[int(i)]
        context, target = self._pairs[q]
        decode = self.tokenizer.decode
        if j is None:
            text = f"{decode(context)}⟦{decode(target)}⟧"
        else:
            text = f"{decode(context + target[:j])}⟦{decode(target[j : j + 1])}⟧"
        return {"key": self.keys[int(i)], "text": text}


def prompts(
    items: Sequence[Mapping[str, Any]] | None = None,
    path: str | Sequence[str] | None = None,
    format: str | None = None,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    key_field: str | None = None,
    tokenizer: str = "bytes",
    max_length: int = 512,
    per_token: bool = False,
    add_bos: bool = True,
) -> PromptDataset:
    """Hydra target: queries from inline `items` ({prompt, completion, key?}) or local files.

    Args:
        items: a list of mappings with "prompt", "completion" and optionally "key".
        path, format: JSONL or Parquet files (globs allowed) with the two text columns.
        prompt_field, completion_field, key_field: column names in those files. A record
            whose prompt or completion (or key) is missing, null or not a string is refused
            (BadRecordError naming the file, line or row and field).
        tokenizer, max_length, add_bos: as for the training data (use the same tokenizer).
        per_token: one row per completion token instead of one per pair.
    """
    if (items is None) == (path is None):
        raise ConfigError("data.query: set exactly one of data.query.items and data.query.path")
    if items is not None:
        for n, it in enumerate(items):
            for name in ("prompt", "completion"):
                if not isinstance(it.get(name), str):
                    raise BadRecordError(
                        f"data.query.items[{n}].{name} is {it.get(name)!r}: give every item a "
                        f"string prompt and completion"
                    )
        keys = [str(it.get("key") or f"prompt/{n}") for n, it in enumerate(items)]
        pairs = [(str(it["prompt"]), str(it["completion"])) for it in items]
    else:
        fields = [
            Field(prompt_field, "data.query.prompt_field"),
            Field(completion_field, "data.query.completion_field"),
        ]
        if key_field:
            fields.append(Field(key_field, "data.query.key_field", key=True))
        keys, pairs = [], []
        files = expand_paths(path, "data.query.path")
        for file, name in zip(files, file_names(files), strict=True):
            fmt = file_format(file, format)
            if fmt == "text":
                raise ConfigError(
                    f"data.query.path: {file} is plain text; prompts come from JSONL or Parquet "
                    f"files with {prompt_field!r} and {completion_field!r} fields"
                )
            records = read_fields(file, fmt, fields)
            for row, values in zip(records.rows, records.values, strict=True):
                keys.append(values[2] if key_field else f"{name}:{row}")
                pairs.append((values[0], values[1]))
    return PromptDataset(
        keys,
        [p for p, _ in pairs],
        [c for _, c in pairs],
        tokenizer,
        max_length,
        per_token,
        add_bos,
    )
