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
"""

from __future__ import annotations

import logging
from typing import Any

from grass_dist.errors import CorruptShardError, DataMismatchError
from grass_dist.gradients import sample_key
from grass_dist.index import GradientIndex, ShardRecord

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
