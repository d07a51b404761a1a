"""Durable gradient index on any fsspec store (local, file://, memory://, s3://)."""

from grass_dist.index.fingerprint import fingerprint_diff
from grass_dist.index.gradient_index import GradientIndex
from grass_dist.index.manifest import ManifestLog, ShardRecord, commit, latest
from grass_dist.index.shards import ShardData, read_shard, write_shard
from grass_dist.index.store import Store
from grass_dist.urls import redact_url

__all__ = [
    "GradientIndex",
    "ManifestLog",
    "ShardData",
    "ShardRecord",
    "Store",
    "commit",
    "fingerprint_diff",
    "latest",
    "read_shard",
    "redact_url",
    "write_shard",
]
