"""Text documents as token rows for a causal LM: local files (JSONL, Parquet, plain text)
or the Python documentation topics that ship with Python (`pydoc_data.topics`).

Each process that builds a dataset reads the files and tokenises the rows itself, so Ray
workers tokenise their own shards. Rows are documents cut to `max_length` tokens
(`long="truncate"`) or consecutive blocks of `max_length` tokens overlapping by one token
(`long="split"`).

JSONL and Parquet records are checked when the dataset is built, before any gradient
(`grass_dist.data.records`).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from grass_dist.data.records import (
    Field,
    check_mode,
    expand_paths,
    file_format,
    file_names,
    read_fields,
    skip_bad,
)
from grass_dist.data.tokenizer import Tokenizer, load_tokenizer
from grass_dist.errors import ConfigError

log = logging.getLogger(__name__)

LONG_MODES = ("truncate", "split")


class TextDataset(Dataset):
    """Token rows of documents.

    Items are dicts {"input_ids": (L,) int64, "labels": (L,) int64} with 2 <= L <= max_length;
    labels equal the inputs (the task shifts them by one). With `add_bos` a document starts
    with the tokenizer's start token. Keys are the document keys, or "<key>#<block>" when a
    document is split into blocks. `skipped_records` counts the bad records left out when
    the documents were read (on_bad_record="skip"). `tokenizer` is "bytes", a local
    directory holding a tokenizer saved with `save_pretrained`, or a transformers tokenizer
    object; use the model's own. Empty or blank documents are refused.
    """

    skipped_records: int = 0

    def __init__(
        self,
        keys: Sequence[str],
        texts: Sequence[str],
        tokenizer: Any = "bytes",
        max_length: int = 512,
        long: str = "truncate",
        add_bos: bool = True,
    ):
        if long not in LONG_MODES:
            raise ConfigError(
                f"long={long!r} is not a way to fit long documents; choose one of "
                f"{list(LONG_MODES)} (in a job: data.train.long)"
            )
        if max_length < 2:
            raise ConfigError(
                f"max_length={max_length} must be >= 2, a context and a target (in a job: "
                "data.train.max_length)"
            )
        if len(keys) != len(texts) or len(set(keys)) != len(keys):
            raise ConfigError("text documents need one unique key each")
        empty = [str(k) for k, t in zip(keys, texts, strict=True) if not str(t).strip()]
        if empty:
            raise ConfigError(
                f"{len(empty)} text document(s) are empty or blank (keys {empty[:5]}): an "
                f"empty document has no token to predict; leave them out"
            )
        self.tokenizer: Tokenizer = load_tokenizer(tokenizer)
        self.max_length, self.add_bos = int(max_length), bool(add_bos)
        self._texts = list(texts)
        self._recent: OrderedDict[int, list[int]] = OrderedDict()
        # Rows are (document, first token, end token); truncation tokenises lazily.
        if long == "truncate":
            self._rows = [(d, 0, self.max_length) for d in range(len(self._texts))]
            self.keys = [str(k) for k in keys]
        else:
            self._rows, self.keys = [], []
            # Blocks overlap by one token, so every token but the first is a target once.
            for d, key in enumerate(keys):
                n = len(self._doc_ids(d))
                for b, start in enumerate(range(0, max(n - 1, 1), self.max_length - 1)):
                    self._rows.append((d, start, start + self.max_length))
                    self.keys.append(f"{key}#{b}")

    def _doc_ids(self, d: int) -> list[int]:
        # The blocks of a document are consecutive rows: keep its last few tokenisations.
        if d in self._recent:
            self._recent.move_to_end(d)
            return self._recent[d]
        ids = self.tokenizer.encode(self._texts[d])
        if self.add_bos and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id, *ids]
        self._recent[d] = ids
        if len(self._recent) > 4:
            self._recent.popitem(last=False)
        return ids

    def _row_ids(self, i: int) -> list[int]:
        d, start, end = self._rows[int(i)]
        return self._doc_ids(d)[start:end]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self._row_ids(i), dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone()}

    def describe(self, i: int) -> dict:
        """Rendering protocol of the report: the row's key and its text (decoded tokens)."""
        return {"key": self.keys[int(i)], "text": self.tokenizer.decode(self._row_ids(i))}


def read_documents(
    paths: str | Sequence[str],
    format: str | None = None,
    field: str = "text",
    key_field: str | None = None,
    separator: str | None = None,
    on_bad_record: str = "error",
) -> tuple[list[str], list[str], list[str]]:
    """(keys, texts, skipped) of the documents in local files, in file then record order.

    Args:
        paths: file paths or glob patterns.
        format: jsonl | parquet | text; None = from each file's extension.
        field: the text column of JSONL / Parquet files.
        key_field: a column of unique document ids (strings or integers); None =
            "<file>:<record number>", the file named from the folder holding all the files.
        separator: plain text files are split on it (e.g. a blank line "\\n\\n"); None = one
            document per file.
        on_bad_record: "error" refuses a record whose text or key is missing, null or not
            a string, or whose key repeats an earlier one (BadRecordError naming the file,
            line or row and field); "skip" leaves it out and lists why in `skipped`.

    Empty or blank documents are left out, not counted as bad: records and whole files with
    a warning naming them; the blank pieces a separator leaves, silently.
    """
    check_mode(on_bad_record, "data.train.on_bad_record")
    files = expand_paths(paths, "data.train.paths")
    fields = [Field(field, "data.train.field")]
    if key_field:
        fields.append(Field(key_field, "data.train.key_field", key=True))
    keys: list[str] = []
    texts: list[str] = []
    skipped: list[str] = []
    empty: list[str] = []
    first_seen: dict[str, str] = {}
    for path, name in zip(files, file_names(files), strict=True):
        fmt = file_format(path, format)
        found = _file_documents(path, name, fmt, fields, separator, on_bad_record, skipped, empty)
        for key, text, where in found:
            if not text.strip():
                if fmt != "text" or separator is None:
                    empty.append(key)
                continue
            if key in first_seen:
                problem = (
                    f"{where} has data.train.key_field={key_field!r} = {key!r}, already the "
                    f"key of {first_seen[key]}"
                )
                skip_bad(skipped, problem, on_bad_record, "data.train.on_bad_record")
                continue
            first_seen[key] = where
            keys.append(key)
            texts.append(text)
    if empty:
        log.warning(
            "left out %d empty or blank document(s) of data.train (no token to predict): %s",
            len(empty),
            ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""),
        )
    return keys, texts, skipped


def _file_documents(
    path: str,
    name: str,
    fmt: str,
    fields: list[Field],
    separator: str | None,
    on_bad_record: str,
    skipped: list[str],
    empty: list[str],
) -> list[tuple[str, str, str]]:
    """(key, text, where) of each document of one file, in record order, before the blank
    and repeated ones are left out; the records refused as bad go to `skipped` (or raise),
    a text file that is blank as a whole to `empty`. `fields` is the text field, then the
    key field where there is one."""
    if fmt == "text":
        with open(path, encoding="utf-8") as f:
            body = f.read()
        docs = [body] if separator is None else body.split(separator)
        if separator is not None and not body.strip():
            empty.append(name)  # the whole file (its blank pieces pass silently)
        return [(f"{name}:{n}", text, path) for n, text in enumerate(docs)]
    records = read_fields(path, fmt, fields, on_bad_record, "data.train.on_bad_record")
    skipped.extend(records.skipped)
    keyed = len(fields) > 1
    return [
        (v[1] if keyed else f"{name}:{n}", v[0], f"{path}, {where}")
        for n, where, v in zip(records.rows, records.where, records.values, strict=True)
    ]


def text_files(
    paths: str | Sequence[str],
    format: str | None = None,
    field: str = "text",
    key_field: str | None = None,
    separator: str | None = None,
    tokenizer: str = "bytes",
    max_length: int = 512,
    long: str = "truncate",
    add_bos: bool = True,
    on_bad_record: str = "error",
) -> TextDataset:
    """Hydra target: a TextDataset of the documents in local files (see read_documents).

    With on_bad_record="skip" the dataset's `skipped_records` counts the records left out,
    and a warning gives the count and the first few reasons.
    """
    keys, texts, skipped = read_documents(paths, format, field, key_field, separator, on_bad_record)
    if skipped:
        log.warning(
            "data.train.on_bad_record=skip: left out %d bad record(s), e.g. %s",
            len(skipped),
            "; ".join(skipped[:3]),
        )
    dataset = TextDataset(keys, texts, tokenizer, max_length, long, add_bos)
    dataset.skipped_records = len(skipped)
    return dataset


def pydoc_documents(doc_chars: int = 300) -> tuple[list[str], list[str]]:
    """(keys, texts): every `pydoc_data.topics` topic cut into documents of whole paragraphs.

    Consecutive paragraphs of a topic are merged while the document stays within
    `doc_chars` characters (a longer paragraph is a document of its own). Keys are
    "pydoc/<topic>/<n>". The text is that of the running Python's documentation.
    """
    from pydoc_data.topics import topics

    keys, texts = [], []
    for topic in sorted(topics):
        paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", topics[topic]) if p.strip()]
        docs: list[str] = []
        for p in paragraphs:
            if docs and len(docs[-1]) + 2 + len(p) <= doc_chars:
                docs[-1] += "\n\n" + p
            else:
                docs.append(p)
        keys.extend(f"pydoc/{topic}/{n}" for n in range(len(docs)))
        texts.extend(docs)
    return keys, texts


def pydoc_topics(
    doc_chars: int = 300,
    n_docs: int | None = None,
    tokenizer: str = "bytes",
    max_length: int = 512,
    long: str = "truncate",
    add_bos: bool = True,
) -> TextDataset:
    """Hydra target: the Python documentation topics as a TextDataset.

    Args:
        doc_chars: target document size in characters (see pydoc_documents).
        n_docs: keep this many documents, evenly spaced over all topics; None = all.
        tokenizer, max_length, long, add_bos: as for TextDataset.
    """
    keys, texts = pydoc_documents(doc_chars)
    if n_docs is not None:
        if not 1 <= n_docs <= len(keys):
            raise ConfigError(f"data.train.n_docs={n_docs} must be in [1, {len(keys)}] or null")
        keep = np.unique(np.linspace(0, len(keys) - 1, n_docs).round().astype(int))
        keys, texts = [keys[i] for i in keep], [texts[i] for i in keep]
    return TextDataset(keys, texts, tokenizer, max_length, long, add_bos)
