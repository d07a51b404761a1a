"""Fault injection (config group `faults`): kill a worker or the reducer at a chosen point.

A fault fires at most once per index: the process that is about to die first claims a
create-only marker under `<index>/_faults/`, so the retried shard or restarted reducer runs
through cleanly, exactly like a real crash followed by a recovery.

`KillOnce` does the same for a scorer task: it travels with a scoring request, and the first
task that reaches its point ends its process; Ray retries the task, which runs through. Its
marker directory must be shared by the scorer processes (a local folder on one machine).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from grass_dist.config import FaultsConfig
from grass_dist.index import Store

log = logging.getLogger(__name__)

FAULTS_DIR = "_faults"


class FaultInjector:
    """Decides, at each injection point, whether this process exits now."""

    def __init__(self, cfg: FaultsConfig, store: Store):
        self.cfg = cfg
        self.store = store
        self.rows_done = 0

    def _claim(self, name: str) -> bool:
        """True for the one caller (across all processes) that claims fault `name`."""
        return self.store.create_only(f"{FAULTS_DIR}/{name}", str(os.getpid()).encode())

    def _die(self, what: str) -> None:
        log.warning("fault injection: %s; exiting this process now", what)
        logging.shutdown()
        os._exit(1)  # no cleanup, no exception: what a killed process looks like to Ray

    def after_rows(self, rows: int, worker_id: int) -> None:
        """Count `rows` more computed rows; exit if `faults.kill_worker_after_rows` is reached."""
        self.rows_done += rows
        limit = self.cfg.kill_worker_after_rows
        if limit is not None and self.rows_done >= limit and self._claim("kill_worker"):
            self._die(
                f"worker {worker_id} computed {self.rows_done} rows "
                f"(faults.kill_worker_after_rows={limit})"
            )

    def reducer(self, stage: str) -> None:
        """Exit if `faults.kill_reducer_during` names `stage` (precondition | score)."""
        if self.cfg.kill_reducer_during == stage and self._claim(f"kill_reducer_{stage}"):
            self._die(f"reducer in stage {stage} (faults.kill_reducer_during={stage})")

    def shard_delay(self) -> None:
        """Sleep `faults.shard_delay_s` (a slow model, to widen windows in drills)."""
        if self.cfg.shard_delay_s > 0:
            time.sleep(self.cfg.shard_delay_s)


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
