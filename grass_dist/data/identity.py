"""Which training set an index belongs to: an index may grow, but never mix two datasets.

Rerunning a job with more training rows (a larger ``data.train``) appends to its index: only
the new shards are computed. Rerunning it with a *different* training set must be refused,
or the index would silently mix gradients of two datasets. Two checks tell them apart:

1. **Identity in the fingerprint.** ``data_identity`` keeps ``data.train``'s ``_target_`` and
   every argument except the dataset's *size arguments*. A dataset declares those in a
   ``size_arguments`` attribute (argument names); changing them may only add or remove rows
   at the end, never change row ``i``. A dataset that declares none cannot grow: all its
   arguments are identity, so any change is a fingerprint mismatch.
2. **Committed rows still match.** ``check_committed_rows`` runs before any compute: the
   dataset must still have every committed row (an index never shrinks), and the keys
   stored for the rows of a few committed shards (first, middle, last) must equal the
   dataset's keys for the same rows. This catches what configuration cannot show: a data
   file replaced behind the same path, a changed shuffle, a size argument that reorders.
   Datasets without ``keys`` use the row number as key, so only check 1 protects them.
3. **Committed content still matches.** ``check_committed_content`` runs before a job that
   writes the index computes anything: it digests every committed row of the current data
   (``grass_dist.index.content``) and compares each shard's digest with the one its worker
   stored in the manifest. A row edited in place under the same key, in any shard, is
   refused with the keys of the first differing rows. Shards written before content
   digests have none to compare; only checks 1 and 2 cover them.

Jobs that only read the index (score, serve) need no training rows for their scores, so
they skip check 3 and never refuse for it: their results name rows by the keys stored in
the index, and the service shows nothing else. The report of a score job draws training
rows from today's data: ``changed_rows`` finds the rows it shows whose content differs from
what was indexed, and ``MarkChanged`` shows a note in place of their content.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from grass_dist.data.items import describe
from grass_dist.errors import CorruptShardError, DataMismatchError
from grass_dist.gradients.computer import sample_key
from grass_dist.index import GradientIndex, ShardRecord
from grass_dist.index.content import row_digest, row_digests, shard_digest

log = logging.getLogger(__name__)


def data_identity(node: dict[str, Any], dataset: Any) -> dict[str, Any]:
    """``node`` (the ``data.train`` config, ``_target_`` included) minus the size arguments."""
    size = set(getattr(dataset, "size_arguments", ()))
    return {name: value for name, value in node.items() if name not in size}


def _sample(records: list[ShardRecord], count: int) -> list[ShardRecord]:
    """Up to ``count`` records spread evenly over ``records`` (first and last included)."""
    if len(records) <= count:
        return records
    step = (len(records) - 1) / (count - 1)
    return [records[round(i * step)] for i in range(count)]


def check_committed_rows(index: GradientIndex, dataset: Any, shards: int = 3) -> None:
    """Refuse a dataset that lacks committed rows or whose keys differ for sampled shards.

    Reads the key column of at most ``shards`` committed shards.

    Raises:
        DataMismatchError: naming the first differing row, its stored and current keys.
    """
    records = sorted(index.committed().values(), key=lambda r: (r.start, r.shard_id))
    if not records:
        return
    where = index.store.url_of("")
    n, end = len(dataset), max(r.end for r in records)
    if end > n:
        raise DataMismatchError(
            f"the gradient index at {where} holds training rows up to {end - 1}, but data.train "
            f"has only {n} rows: an index can grow, not shrink. Fix: use the full training "
            "set (a larger data.train), or a new store.url for the smaller one."
        )
    for record in _sample(records, shards):
        try:
            data = index.read(record, layers=[], verify=False)
        except CorruptShardError as exc:
            # Unreadable shards are repair's business (index.repair=true); check the others.
            log.warning("data check skips shard %s: %s", record.shard_id, exc)
            continue
        for row, stored in zip(data.row_ids.tolist(), data.keys, strict=True):
            current = sample_key(dataset, row)
            if current != stored:
                raise DataMismatchError(
                    f"data.train is not the dataset the gradient index at {where} was built "
                    f"from: row {row} has key {stored!r} in the index (shard "
                    f"{record.shard_id}) but {current!r} in data.train. Fix: use the same "
                    "training data (rows may only be added at the end), or a new store.url."
                )


def _named_rows(
    index: GradientIndex, dataset: Any, changed: list[tuple[ShardRecord, np.ndarray]], limit: int
) -> list[str]:
    """``row 37 (key 'k37')`` for up to ``limit`` differing rows, first rows first.

    ``changed``: (record, current digests (rows, 32) uint8) of each shard whose digest
    differs. A shard file without readable row digests is named by its row range.
    """
    named: list[str] = []
    for record, current in changed:
        try:
            stored = index.read(record, layers=[], verify=False).digests
        except CorruptShardError:
            stored = None
        if stored is None or stored.shape != current.shape:
            named.append(f"rows {record.start}..{record.end - 1} (shard {record.shard_id})")
        else:
            for pos in np.flatnonzero((stored != current).any(axis=1))[: limit - len(named)]:
                row = record.start + int(pos)
                named.append(f"row {row} (key {sample_key(dataset, row)!r})")
        if len(named) >= limit:
            break
    return named


def check_committed_content(index: GradientIndex, dataset: Any, limit: int = 5) -> None:
    """Refuse ``dataset`` when the content of any committed row changed since it was indexed.

    Digests every committed row of ``dataset`` (a full pass over the committed rows, no
    model work) and compares each shard's digest with its record's ``data_sha256``; reads
    a shard file only when its digest differs, to name the rows.

    Raises:
        DataMismatchError: naming the first ``limit`` differing rows and their keys.
    """
    records = sorted(index.committed().values(), key=lambda r: (r.start, r.shard_id))
    signed = [r for r in records if r.data_sha256]
    if len(signed) < len(records):
        log.warning(
            "%d committed shards were written before content digests: their rows are checked "
            "by key only (rebuild the index to cover them)",
            len(records) - len(signed),
        )
    t0, changed = time.perf_counter(), []
    for record in signed:
        current = row_digests(dataset[row] for row in range(record.start, record.end))
        if shard_digest(current) != record.data_sha256:
            changed.append((record, current))
    rows = sum(r.rows for r in signed)
    log.info("content check: %d committed rows in %.2f s", rows, time.perf_counter() - t0)
    if changed:
        where = index.store.url_of("")
        named = ", ".join(_named_rows(index, dataset, changed, limit))
        raise DataMismatchError(
            f"the training data changed since the gradient index at {where} was built: "
            f"{len(changed)} of {len(signed)} committed shards hold rows whose content "
            f"differs, first {named}. Adding shards would mix gradients of two datasets. "
            "Fix: restore the training data as it was, or build a new index for it (a new "
            "store.url)."
        )


def changed_rows(index: GradientIndex, dataset: Any, rows: list[int]) -> list[int]:
    """The ``rows`` whose content in ``dataset`` differs from what the index was built from.

    Reads the row digests of only the shards holding ``rows``. Rows past the end of
    ``dataset`` count as changed; rows of shards without digests (written before them) or
    whose file is unreadable cannot be checked and count as unchanged.
    """
    wanted, n, out = sorted({int(r) for r in rows}), len(dataset), []
    for record in index.committed().values():
        inside = [r for r in wanted if record.start <= r < record.end]
        if not inside or not record.data_sha256:
            continue
        try:
            stored = index.read(record, layers=[], verify=False).digests
        except CorruptShardError:
            continue  # repair's business (index.repair=true)
        if stored is None:
            continue
        for row in inside:
            if row >= n or row_digest(dataset[row]) != stored[row - record.start].tobytes():
                out.append(row)
    return sorted(out)


class MarkChanged:
    """``dataset`` as a report shows it: a row in ``changed`` shows a note in place of its
    content, since its scores come from the content it had when it was indexed."""

    NOTE = "changed since the index was built: these scores are of its earlier content"

    def __init__(self, dataset: Any, changed: list[int]) -> None:
        self.dataset, self.changed = dataset, set(changed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int) -> Any:
        return self.dataset[row]

    def describe(self, row: int) -> dict[str, Any]:
        """``items.describe`` of the row, or its key, label "?" and the note when changed."""
        if row in self.changed:
            return {"key": sample_key(self.dataset, row), "label": "?", "text": self.NOTE}
        return describe(self.dataset, row)
