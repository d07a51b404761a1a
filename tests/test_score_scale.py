"""All-pairs scoring at scale: 200k train rows x 5k queries at k = 1024 within 2 GiB.

The scoring runs in a subprocess (tests/scale_scoring.py: synthetic float16 index, Reducer
on an embedded Ray with 2 CPUs, brute-force check of a random subset of queries). Memory
is the peak, over samples every 50 ms, of the summed proportional set size (PSS) of every
process of that subprocess's tree (driver, Ray daemons, reducer, scorer workers): shared
pages are split between the processes that map them, so shared libraries and the object
store count once. The summed resident set size (RSS, shared pages counted once per
process) is reported alongside as an upper bound.
"""

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.conftest import ROOT
from tests.memwatch import TreeMemory

pytestmark = pytest.mark.integration

GIB = 1 << 30


def test_200k_rows_by_5k_queries_at_k_1024_match_brute_force_within_2_gib(tmp_path):
    tag = uuid.uuid4().hex
    env = {**os.environ, "GRASS_DIST_MEMTAG": tag}
    cmd = [sys.executable, "-m", "tests.scale_scoring", str(tmp_path / "index")]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with TreeMemory(proc.pid, f"GRASS_DIST_MEMTAG={tag}") as mem:
        try:
            out, err = proc.communicate(timeout=540)
        finally:
            proc.kill()
    assert proc.returncode == 0, err[-4000:]
    summary = json.loads(out.strip().splitlines()[-1])
    breakdown = "\n".join(
        f"{pss / 2**20:7.0f} MiB PSS {rss / 2**20:7.0f} MiB RSS  {name}"
        for name, rss, pss in sorted(mem.at_peak, key=lambda x: -x[2])
    )
    print(f"\nscale scoring: {json.dumps(summary)}; peak PSS {mem.peak_pss / GIB:.2f} GiB, "
          f"peak RSS sum {mem.peak_rss / GIB:.2f} GiB over {mem.max_processes} processes\n"
          f"{breakdown}")  # fmt: skip
    assert mem.max_processes >= 4  # the sampler saw the Ray processes, not just the driver
    assert mem.peak_pss < 2 * GIB, breakdown
