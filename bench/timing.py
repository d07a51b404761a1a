"""Interleaved timing for benchmarks on a shared, noisy machine.

Every competitor runs once per repetition, in turn (A, B, C, A, B, C, ...), so load changes
hit all of them alike; each is reported as the median over repetitions of both wall time
and process CPU time. With one torch thread, CPU time is the work done, whatever else the
machine runs; wall time is what a user waits.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


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


def write_result(out: str | Path, lines: list[str]) -> None:
    """Write a benchmark's markdown lines to `out` (making its folder) and say where."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
