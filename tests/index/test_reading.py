"""Reading an index and its results from a plain process: no torch, and a clean exit."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

# Write a small Parquet file to bytes, read it back with table_from_bytes, exit. Reading
# Python bytes through pq.read_table's pre-buffering aborted about one such process in ten
# at exit ("terminate called without an active exception"), after its output was printed;
# with the decoding on Arrow's CPU threads, about one in several hundred still did on a
# loaded machine. The read starts no thread (Linux's /proc/self/task counts them).
READ_AND_EXIT = """
import io, os, sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from grass_dist.index.shards import table_from_bytes
buf = io.BytesIO()
pq.write_table(pa.table({"train_row": np.arange(2000), "score": np.ones(2000)}), buf)
threads = len(os.listdir("/proc/self/task"))
table = table_from_bytes(buf.getvalue())
assert table.num_rows == 2000 and "torch" not in sys.modules, sorted(sys.modules)
assert len(os.listdir("/proc/self/task")) == threads, "the read started threads"
print("read")
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_reading_results_imports_no_torch():
    """README's result reads import the index and the result tables, never torch (whose
    import alone takes seconds)."""
    done = _run(
        "import sys\n"
        "from grass_dist.index import GradientIndex\n"
        "from grass_dist.scoring.results import load_dense, load_table\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')))"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_processes_that_read_result_bytes_exit_cleanly():
    """48 processes, 4 at a time, each reading a Parquet file from bytes: every one exits 0
    (read the old way, 6 of 48 aborted in one run on a 2-core machine)."""
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(_run, [READ_AND_EXIT] * 48))
    failed = [(run.returncode, run.stderr[-300:]) for run in runs if run.returncode != 0]
    assert not failed, f"{len(failed)} of {len(runs)} readers failed: {failed[:3]}"
    assert all(run.stdout.strip() == "read" for run in runs)
