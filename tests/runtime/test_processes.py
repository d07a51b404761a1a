"""Stopping what a Ray start cut short left: the processes it started, frozen before any is
killed, and none of those the process had before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from grass_dist.runtime import processes

# A parent that forks a child every 10 ms for good: killed while it forks, a child it made
# just then would pass to init and run on unless the parent was stopped first.
_FORKER = """
import subprocess, sys, time
child = [sys.executable, "-c", "import time; time.sleep(60)", *sys.argv[1:]]
kids = []
while True:
    kids.append(subprocess.Popen(child))
    time.sleep(0.01)
"""


def _orphans(token: str) -> list[int]:
    """Live processes passed to init whose command line holds `token`."""
    found = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # just exited
        if token.encode() in command and processes._parent(pid) == 1 and processes.running(pid):
            found.append(pid)
    return found


def _alive(pids):
    return [pid for pid in pids if processes.running(pid)]


def test_stop_half_started_kills_what_came_after_and_spares_what_was_there():
    kept = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ended = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])  # not waited for
    try:
        before = processes.children()
        assert kept.pid in before
        while processes.running(ended.pid):
            time.sleep(0.01)
        token = f"forked-by-{os.getpid()}-{time.time_ns()}"  # names its children's commands
        forker = subprocess.Popen([sys.executable, "-c", _FORKER, token])
        deadline = time.monotonic() + 30
        while len(processes.below(forker.pid)) < 5:  # forking by now
            assert time.monotonic() < deadline, "the forker never forked"
            time.sleep(0.05)
        seen = processes.below(forker.pid)
        processes.stop_half_started(spare=before)
        forker.wait(timeout=10)
        assert _alive(seen) == []
        assert processes.below(os.getpid(), spare=before) == []  # no child of it left
        orphans = _orphans(token)
        assert orphans == []  # none passed to init
        assert processes.running(kept.pid)  # what was there before is left alone
        assert ended.wait(timeout=10) == 3  # and its status is its owner's to collect
    finally:
        kept.kill()
        kept.wait()


# A process that adopts orphans; its child starts a grandchild and exits at once, as a raylet
# killed just after it forked an agent. The grandchild must stay below it, and be stopped.
_ADOPTER = """
import json, subprocess, sys, time
from grass_dist.runtime import processes
assert processes.adopt_orphans()
sleeper = "import time; time.sleep(60)"
starter = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {sleeper!r}])"
middle = subprocess.Popen([sys.executable, "-c", starter])
middle.wait()
deadline = time.monotonic() + 30
while not processes.children() and time.monotonic() < deadline:
    time.sleep(0.02)
orphan = sorted(processes.children())
processes.stop_half_started()
print(json.dumps([orphan, [pid for pid in orphan if processes.running(pid)]]))
"""


def test_an_adopting_process_keeps_its_orphans_in_reach():
    done = subprocess.run([sys.executable, "-c", _ADOPTER], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    adopted, left = json.loads(done.stdout)
    assert len(adopted) == 1  # the grandchild came to the adopter, not to init
    assert left == []  # and was stopped
