"""Fixtures of the index tests: every test that takes `url` runs on local disk and in memory."""

from __future__ import annotations

import uuid

import fsspec
import pytest


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path):
    """An index location that does not exist yet: a local folder, or a fresh memory:// prefix
    (removed afterwards, since fsspec's memory filesystem is shared by the process)."""
    if request.param == "local":
        yield str(tmp_path / "idx")
        return
    prefix = f"grass-test-{uuid.uuid4().hex}"
    yield f"memory://{prefix}"
    mem = fsspec.filesystem("memory")
    if mem.exists(f"/{prefix}"):
        mem.rm(f"/{prefix}", recursive=True)
