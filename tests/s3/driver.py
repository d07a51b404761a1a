"""A driver process for the two-drivers test: spawned, it prepares the job and builds the
whole index in process (no Ray), starting at the same moment as the other driver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.s3.conftest import Backend, index_in_process


def build_index(
    out: str, url: str, options: dict[str, Any], overrides: list[str], barrier: Any
) -> None:
    """Compose the test config for ``url`` with ``overrides`` and build its index."""
    cfg = Backend("driver", url, options).cfg(Path(out), *overrides)
    barrier.wait(timeout=120)
    index_in_process(cfg)
