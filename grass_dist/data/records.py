"""Records of local data files (JSONL, Parquet, plain text): which files, which format, and
the string fields of every record, checked before any gradient.

A record whose field is missing, null or not a string is refused with its file, line
(JSONL, from 1) or row (Parquet, from 0) and field, or skipped and counted with
`on_bad_record="skip"`. Training documents (`grass_dist.data.text`) and query prompts
(`grass_dist.data.prompts`) are read through it.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from grass_dist.errors import BadRecordError, ConfigError

BAD_RECORD_MODES = ("error", "skip")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text"}


def expand_paths(paths: str | Sequence[str], setting: str) -> list[str]:
    """Local files matching the paths or glob patterns, sorted within each pattern; a
    pattern that matches none is refused naming `setting`, where it came from."""
    patterns = [paths] if isinstance(paths, str) else [str(p) for p in paths]
    files = []
    for pattern in patterns:
        found = sorted(glob.glob(os.path.expanduser(pattern)))
        if not found:
            raise ConfigError(
                f"{setting}: {pattern!r} matches no local file (a relative path starts at "
                f"the working folder, {os.getcwd()}); give the path or glob of existing files"
            )
        files.extend(found)
    return files


def file_names(files: Sequence[str]) -> list[str]:
    """Each file's name in record keys ("<name>:<record>"): its path from the folder that
    holds all of them, so the keys are the same whatever the working folder or the form of
    the path (relative, absolute, with ~)."""
    paths = [os.path.abspath(f) for f in files]
    if not paths:
        return []
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return [os.path.relpath(p, root) for p in paths]


def file_format(path: str, format: str | None) -> str:
    """jsonl | parquet | text: `format` if given, else from the file's extension."""
    fmt = format or FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt not in ("jsonl", "parquet", "text"):
        raise ConfigError(
            f"cannot tell the format of {path}; set data.format to jsonl, parquet or text"
        )
    return fmt


@dataclass(frozen=True)
class Field:
    """A column a dataset reads from each record, and the config option that names it."""

    column: str
    option: str  # e.g. "data.train.field": what error messages tell the user to fix
    key: bool = False  # a document id: integers are accepted (as their decimal text)


def _jsonl_records(path: str) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """(where, record) per non-blank line; a line that is no JSON object gives the reason."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {n}", f"is not valid JSON ({e})"
                continue
            if isinstance(record, dict):
                yield f"line {n}", record
            else:
                yield f"line {n}", f"is a JSON {type(record).__name__}, not an object"


def _parquet_records(path: str, columns: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    table = pq.read_table(path, columns=columns)
    values = [table.column(c).to_pylist() for c in columns]
    for row in range(table.num_rows):
        yield f"row {row}", {c: v[row] for c, v in zip(columns, values, strict=True)}


def _problem(record: dict[str, Any], field: Field) -> str | None:
    """Why `record`'s value of `field` is unusable, or None."""
    if field.column not in record:
        return f"has no {field.option}={field.column!r} (its fields: {sorted(record)})"
    value = record[field.column]
    if isinstance(value, str) or (field.key and type(value) is int):
        return None
    shown = "null" if value is None else f"{type(value).__name__} {value!r:.40}"
    return f"has {field.option}={field.column!r} = {shown}, not a string"


def check_mode(on_bad_record: str, option: str) -> None:
    """Refuse an on_bad_record value other than "error" or "skip" (ConfigError naming it)."""
    if on_bad_record not in BAD_RECORD_MODES:
        raise ConfigError(f"{option}={on_bad_record!r}; choose one of {list(BAD_RECORD_MODES)}")


@dataclass
class Records:
    """The usable records of a file: record numbers (from 0, blank JSONL lines not counted),
    where each is ("line 3" / "row 2"), their field values, and why others were skipped."""

    rows: list[int]
    where: list[str]
    values: list[list[str]]
    skipped: list[str]


def read_fields(
    path: str, fmt: str, fields: Sequence[Field], on_bad_record: str = "error", option: str = ""
) -> Records:
    """The string fields of every record of a JSONL or Parquet file.

    A column no record has is a ConfigError (the option names a wrong column); a record
    whose field is missing, null or not a string is a BadRecordError naming the file,
    line/row and option, or is skipped when `on_bad_record` is "skip". `option` names the
    on_bad_record option in messages (e.g. "data.train.on_bad_record").
    """
    if fmt == "parquet":
        names = pq.read_schema(path).names
        missing = [f for f in fields if f.column not in names]
        records = _parquet_records(path, [f.column for f in fields if f.column in names])
    else:
        records = list(_jsonl_records(path))
        names = sorted({c for _, r in records if isinstance(r, dict) for c in r})
        missing = [f for f in fields if f.column not in names]
    if missing:
        raise ConfigError(
            f"{path} has no column {missing[0].column!r} ({missing[0].option}); its "
            f"columns: {names}"
        )
    out = Records([], [], [], [])
    for n, (where, record) in enumerate(records):
        reason = record if isinstance(record, str) else None
        for field in fields if reason is None else ():
            reason = _problem(record, field)
            if reason is not None:
                break
        if reason is None:
            out.rows.append(n)
            out.where.append(where)
            out.values.append([str(record[f.column]) for f in fields])
        else:
            skip_bad(out.skipped, f"{path}, {where} {reason}", on_bad_record, option)
    return out


def skip_bad(skipped: list[str], problem: str, on_bad_record: str, option: str) -> None:
    """Note a bad record in `skipped`, or refuse it (BadRecordError) unless skipping."""
    if on_bad_record != "skip":
        fix = f" or set {option}=skip to leave such records out" if option else ""
        raise BadRecordError(f"{problem}: fix the record{fix}")
    skipped.append(problem)
