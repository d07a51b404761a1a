"""A store that acknowledges create-only puts but overwrites: what s3fs sees of an S3 server
that ignores If-None-Match. Importing this module registers it as ``ignorecreate://``.

It wraps a local directory or an S3 prefix (fsspec's DirFileSystem), so everything but the
create-only mode works as on the store underneath.
"""

from __future__ import annotations

from typing import Any

import fsspec
from fsspec.implementations.dirfs import DirFileSystem

PROTOCOL = "ignorecreate"


class IgnoresCreateOnly(DirFileSystem):
    """DirFileSystem whose ``pipe_file`` drops ``mode``: a "create" put silently replaces."""

    protocol = PROTOCOL

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        super().pipe_file(path, value, **kwargs)


fsspec.register_implementation(PROTOCOL, IgnoresCreateOnly, clobber=True)


def wrap(url: str, storage_options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(URL, storage options) of the store at ``url`` seen through ``IgnoresCreateOnly``."""
    scheme, sep, rest = url.partition("://")
    parent, _, name = (rest if sep else url).rstrip("/").rpartition("/")
    if sep:  # s3://bucket/prefix
        return f"{PROTOCOL}://{name}", {
            "path": parent,
            "target_protocol": scheme,
            "target_options": storage_options,
        }
    return f"{PROTOCOL}://{name}", {
        "path": parent,
        "target_protocol": "file",
        "target_options": {"auto_mkdir": True},
    }
