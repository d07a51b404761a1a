"""Fault injection for recovery tests: kill a scorer's worker process at a chosen point.

`KillOnce(marker_dir, point)` travels with a scoring request. The first task that reaches
`point` creates a marker file (create-only, so exactly one task wins) and ends its process
with `os._exit`, as a crash or an OOM kill would; Ray then retries the task, which finds
the marker and runs through. The marker directory must be shared by the scorer processes
(a local folder on a one-machine cluster).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

POINTS = ("after_dense_part", "after_shard")


@dataclass(frozen=True)
class KillOnce:
    marker_dir: str
    point: str = "after_dense_part"

    def __post_init__(self) -> None:
        if self.point not in POINTS:
            raise ValueError(f"fault point {self.point!r} is unknown; use one of {POINTS}")

    def reached(self, point: str) -> None:
        """Called by the scorer at each `point`: exits the process the first time only."""
        if point != self.point:
            return
        try:
            with open(os.path.join(self.marker_dir, f"killed-{point}"), "x"):
                pass
        except FileExistsError:
            return
        log.warning("fault injection: killing scorer process %d at %s", os.getpid(), point)
        os._exit(17)
