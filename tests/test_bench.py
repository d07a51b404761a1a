"""The benchmark scripts run end to end at tiny sizes (their numbers are not checked here)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    _run("bench_gpu.py", "--tiny", "--reps", "1", "--out", str(out))
    table = out.read_text()
    for method in ("plain fwd+bwd", "grass_dist factgrass", "grass_dist logra"):
        assert f"| {method} | " in table
    assert "bf16, sequence 32, batch 2, 14 Linear layers" in table


def test_breakdown_phases_reproduce_compress(tmp_path):
    # The script raises if its phase-by-phase FactGraSS differs from compress() by one bit.
    out = tmp_path / "breakdown.md"
    args = ["--model", "mlp", "--batch", "16", "--k", "256", "--shard-batches", "2", "--reps", "1"]
    _run("bench_breakdown.py", *args, "--out", str(out))
    assert "| SJLT | " in out.read_text()
