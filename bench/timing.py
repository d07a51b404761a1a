"""Interleaved timing for benchmarks on a shared, noisy machine.

Every competitor runs once per repetition, in turn (A, B, C, A, B, C, ...), so load changes
hit all of them alike; each is reported as the median over repetitions of both wall time
and process CPU time. With one torch thread, CPU time is the work done, whatever else the
machine runs; wall time is what a user waits. A whole subprocess (a job with its Ray
processes, a peer tool with its ranks) is measured by `TreeCPU`: the CPU time of its whole
process tree.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from grass_dist.runtime import processes


@dataclass
class Timing:
    """Seconds per call of one competitor: every repetition's wall and CPU time."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_s(self) -> float:
        return statistics.median(self.cpu)


def time_once(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1
) -> dict[str, Timing]:
    """Time each function `reps` times, alternating between them after `warmup` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {name: Timing() for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            wall, cpu = time_once(fn)
            out[name].wall.append(wall)
            out[name].cpu.append(cpu)
    return out


def machine_note(threads: int) -> str:
    """One line on the machine's state, for the results file."""
    return (
        f"torch threads: {threads}; cores: {os.cpu_count()}; load average at start: "
        f"{os.getloadavg()[0]:.1f} (a shared machine: ratios are measured within one run, "
        f"competitors interleaved, medians of repetitions)"
    )


def job_summary(output: str) -> dict:
    """The JSON summary a grass_dist job prints last (an indented object ending its output)."""
    start = output.rfind("\n{\n")
    if start < 0 and not output.startswith("{"):
        raise SystemExit(f"no job summary at the end of the output:\n{output[-2000:]}")
    return json.loads(output[start + 1 :])


def write_result(out: str | Path, lines: list[str]) -> None:
    """Write a benchmark's markdown lines to `out` (making its folder) and say where."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """Own user+system CPU seconds of process `pid` (from /proc), None once it is gone."""
    fields = processes.stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS if fields else None


class TreeCPU:
    """CPU seconds of a process and all its descendants (Ray's daemons and workers,
    bergson's launched ranks), sampled from /proc every `interval` seconds while it runs;
    each process counts with its last sample (own time only, so nothing is counted twice)."""

    def __init__(self, root: int, interval: float = 0.5):
        self.root, self.interval = root, interval
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        for pid in [self.root, *processes.below(self.root)]:
            seconds = cpu_seconds(pid)
            if seconds is not None:
                self.last[pid] = seconds

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> float:
        """Stop sampling; the tree's CPU seconds."""
        self._stop.set()
        self._thread.join()
        return sum(self.last.values())
