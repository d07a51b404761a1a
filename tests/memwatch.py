"""Peak memory of a process tree, sampled from /proc (Linux).

A process belongs to the tree if it descends from the root pid or carries the tag in its
environment (Ray daemons may be re-parented, but they inherit the driver's environment).
Each sample sums, over the tree, the resident set size (RSS: shared pages counted once per
process that maps them, an upper bound) and the proportional set size (PSS: each shared page
split between the processes that map it).
"""

from __future__ import annotations

import os
import threading
import time


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _stat(pid: int) -> tuple[int, int]:
    """(parent pid, start time): the pair identifies a process even when pids are reused."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return 0, 0
    fields = stat.rsplit(b")", 1)[1].split()
    return int(fields[1]), int(fields[19])


def _name(pid: int) -> str:
    cmd = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace")
    return f"{pid} {cmd[:80]}"


def _memory_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith(b"Rss:"):
            rss = int(line.split()[1])
        elif line.startswith(b"Pss:"):
            pss = int(line.split()[1])
    return rss, pss


class TreeMemory:
    """Samples every `interval` s in a thread until stopped; peaks in bytes."""

    def __init__(self, root: int, tag: str, interval: float = 0.05):
        self.root, self.tag, self.interval = root, tag.encode(), interval
        self.peak_rss = self.peak_pss = 0
        self.max_processes = 0
        self.at_peak: list[tuple[str, int, int]] = []  # (process, rss, pss) at the PSS peak
        self._tagged: dict[tuple[int, int], bool] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        """Start the peaks afresh (from the next sample on): one watcher, several phases."""
        with self._lock:
            self.peak_rss = self.peak_pss = 0
            self.at_peak = []

    def _members(self) -> list[int]:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        stats = {p: _stat(p) for p in pids}
        parents = {p: s[0] for p, s in stats.items()}
        members = {self.root}
        changed = True
        while changed:
            changed = False
            for p, parent in parents.items():
                if p not in members and parent in members:
                    members.add(p)
                    changed = True
        for p in pids:
            key = (p, stats[p][1])
            if key not in self._tagged:
                self._tagged[key] = self.tag in _read(f"/proc/{p}/environ")
            if self._tagged[key]:
                members.add(p)
        return sorted(members)

    def _run(self) -> None:
        while not self._stop.is_set():
            members = self._members()
            usage = [_memory_kib(p) for p in members]
            with self._lock:
                self.peak_rss = max(self.peak_rss, 1024 * sum(u[0] for u in usage))
                pss = 1024 * sum(u[1] for u in usage)
                if pss > self.peak_pss:
                    self.peak_pss = pss
                    self.at_peak = [
                        (_name(p), 1024 * u[0], 1024 * u[1])
                        for p, u in zip(members, usage, strict=True)
                        if u[0]
                    ]
            self.max_processes = max(self.max_processes, sum(1 for u in usage if u[0]))
            time.sleep(self.interval)
