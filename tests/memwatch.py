"""Peak memory of a process tree, sampled from /proc (Linux).

A process belongs to the tree if it descends from the root pid or carries the tag in its
environment (Ray daemons may be re-parented, but they inherit the driver's environment).
Each sample sums, over the tree, the resident set size (RSS: shared pages counted once per
process that maps them, an upper bound) and the proportional set size (PSS: each shared page
split between the processes that map it).

RSS is cheap to read (/proc/<pid>/statm, a counter); PSS is not (smaps_rollup walks the
process's page tables: 5-40 ms for one Ray process, 60-180 ms for a tree of 13, which sampled
every 50 ms took most of a core and slowed the processes it watched). So a process's PSS is
read again when its RSS has moved by REREAD_GROWTH since the last read, or that read is
REREAD_AFTER seconds old; in between it counts as that PSS plus the RSS grown since (what
new private pages add; a page newly shared with a process of the tree adds less), at most
its RSS.
"""

from __future__ import annotations

import os
import threading
import time

REREAD_GROWTH = 8 << 20  # bytes of RSS growth that make a process's PSS be read again
REREAD_AFTER = 2.0  # seconds after which a process's PSS is read again anyway
_PAGE = os.sysconf("SC_PAGE_SIZE")


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


def _rss(pid: int) -> int:
    """Resident bytes (0 once the process is gone)."""
    fields = _read(f"/proc/{pid}/statm").split()
    return int(fields[1]) * _PAGE if len(fields) > 1 else 0


def _pss(pid: int) -> int:
    """Proportional set size in bytes (0 once the process is gone)."""
    for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith(b"Pss:"):
            return int(line.split()[1]) * 1024
    return 0


class TreeMemory:
    """Samples every `interval` s in a thread until stopped; peaks in bytes."""

    def __init__(self, root: int, tag: str, interval: float = 0.05):
        self.root, self.tag, self.interval = root, tag.encode(), interval
        self.peak_rss = self.peak_pss = 0
        self.max_processes = 0
        self.at_peak: list[tuple[str, int, int]] = []  # (process, rss, pss) at the PSS peak
        self._tagged: dict[tuple[int, int], bool] = {}
        self._read_pss: dict[int, tuple[float, int, int]] = {}  # pid -> (when, rss, pss)
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

    def _usage(self, pid: int, now: float) -> tuple[int, int]:
        """(RSS, PSS) of `pid` now, its PSS read again or carried forward (module doc)."""
        rss = _rss(pid)
        if not rss:  # gone (or a kernel thread)
            self._read_pss.pop(pid, None)
            return 0, 0
        when, rss0, pss0 = self._read_pss.get(pid, (-REREAD_AFTER, 0, 0))
        if abs(rss - rss0) < REREAD_GROWTH and now - when < REREAD_AFTER:
            return rss, min(rss, pss0 + max(0, rss - rss0))
        pss = _pss(pid)
        self._read_pss[pid] = (now, rss, pss)
        return rss, pss

    def _run(self) -> None:
        while not self._stop.is_set():
            members = self._members()
            now = time.monotonic()
            usage = [self._usage(p, now) for p in members]
            with self._lock:
                self.peak_rss = max(self.peak_rss, sum(u[0] for u in usage))
                pss = sum(u[1] for u in usage)
                if pss > self.peak_pss:
                    self.peak_pss = pss
                    self.at_peak = [
                        (_name(p), u[0], u[1]) for p, u in zip(members, usage, strict=True) if u[0]
                    ]
            self.max_processes = max(self.max_processes, sum(1 for u in usage if u[0]))
            time.sleep(self.interval)
