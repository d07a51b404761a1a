"""Text documents as token rows for a causal LM: local files (JSONL, Parquet, plain text)
or the Python documentation topics that ship with Python (`pydoc_data.topics`).

Each process that builds a dataset reads the files and tokenises the rows itself, so Ray
workers tokenise their own shards. Rows are documents cut to `max_length` tokens
(`long="truncate"`) or consecutive blocks of `max_length` tokens overlapping by one token
(`long="split"`).
"""

from __future__ import annotations

import glob
import os
import re
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from grass_dist.data.tokenizer import Tokenizer, load_tokenizer
from grass_dist.errors import ConfigError

LONG_MODES = ("truncate", "split")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text"}


class TextDataset(Dataset):
    """Token rows of documents.

    Items are dicts {"input_ids": (L,) int64, "labels": (L,) int64} with 2 <= L <= max_length;
    labels equal the inputs (the task shifts them by one). With `add_bos` a document starts
    with the tokenizer's start token. Keys are the document keys, or "<key>#<block>" when a
    document is split into blocks.
    """

    def __init__(
        self,
        keys: Sequence[str],
        texts: Sequence[str],
        tokenizer: str = "bytes",
        max_length: int = 512,
        long: str = "truncate",
        add_bos: bool = True,
    ):
        if long not in LONG_MODES:
            raise ConfigError(f"data.long={long!r}; choose one of {list(LONG_MODES)}")
        if max_length < 2:
            raise ConfigError(f"data.max_length={max_length} must be >= 2 (a context and a target)")
        if len(keys) != len(texts) or len(set(keys)) != len(keys):
            raise ConfigError("text documents need one unique key each")
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


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """Local files matching the paths or glob patterns, sorted within each pattern."""
    patterns = [paths] if isinstance(paths, str) else [str(p) for p in paths]
    files = []
    for pattern in patterns:
        found = sorted(glob.glob(os.path.expanduser(pattern)))
        if not found:
            raise ConfigError(f"data paths: {pattern!r} matches no local file")
        files.extend(found)
    return files


def file_format(path: str, format: str | None) -> str:
    """jsonl | parquet | text: `format` if given, else from the file's extension."""
    fmt = format or FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt not in ("jsonl", "parquet", "text"):
        raise ConfigError(
            f"cannot tell the format of {path}; set data.format to jsonl, parquet or text"
        )
    return fmt


def read_table(path: str, fmt: str):
    """A JSONL (one object per line) or Parquet file as a pyarrow Table."""
    return pa_json.read_json(path) if fmt == "jsonl" else pq.read_table(path)


def column(table, name: str, path: str, what: str) -> list[str]:
    """Column `name` as strings; the error names the config field `data.<what>`."""
    if name not in table.column_names:
        raise ConfigError(
            f"{path} has no column {name!r} (data.{what}); its columns: {table.column_names}"
        )
    return [str(v) for v in table.column(name).to_pylist()]


def read_documents(
    paths: str | Sequence[str],
    format: str | None = None,
    field: str = "text",
    key_field: str | None = None,
    separator: str | None = None,
) -> tuple[list[str], list[str]]:
    """(keys, texts) of the documents in local files, in file then row order.

    Args:
        paths: file paths or glob patterns.
        format: jsonl | parquet | text; None = from each file's extension.
        field: the text column of JSONL / Parquet files.
        key_field: a column of unique document ids; None = "<file>:<row>".
        separator: plain text files are split on it (e.g. a blank line "\\n\\n"); None = one
            document per file.

    Empty documents are skipped.
    """
    files = expand_paths(paths)
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    keys, texts = [], []
    for path in files:
        fmt, ids = file_format(path, format), None
        if fmt == "text":
            with open(path, encoding="utf-8") as f:
                body = f.read()
            docs = [body] if separator is None else body.split(separator)
        else:
            table = read_table(path, fmt)
            docs = column(table, field, path, "field")
            ids = column(table, key_field, path, "key_field") if key_field else None
        name = os.path.relpath(os.path.abspath(path), root)
        for row, text in enumerate(docs):
            if text.strip():
                keys.append(ids[row] if ids else f"{name}:{row}")
                texts.append(text)
    return keys, texts


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
) -> TextDataset:
    """Hydra target: a TextDataset of the documents in local files (see read_documents)."""
    keys, texts = read_documents(paths, format, field, key_field, separator)
    return TextDataset(keys, texts, tokenizer, max_length, long, add_bos)


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
