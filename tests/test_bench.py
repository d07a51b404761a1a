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


def test_compressor_benchmark_runs_tiny(tmp_path):
    out = tmp_path / "compressors.md"
    _run(
        "bench_compressors.py",
        "--d-in",
        "32",
        "--d-out",
        "32",
        "--k",
        "16",
        "--batch",
        "4",
        "--seq",
        "1",
        "4",
        "--reps",
        "1",
        "--out",
        str(out),
    )
    assert "| 4 | factgrass | " in out.read_text()


def test_index_throughput_benchmark_runs_tiny(tmp_path):
    out = tmp_path / "throughput.md"
    args = ["--k", "64", "--mlp-batch", "8", "--gpt-batch", "1", "--reps", "1"]
    _run("bench_index_throughput.py", *args, "--dattri", "off", "--out", str(out))
    table = out.read_text()
    for model in ("mlp", "gpt"):
        assert f"| {model} | 64 | " in table and "grass_dist factgrass" in table


def test_lm_throughput_benchmark_runs_tiny(tmp_path):
    out = tmp_path / "lm.md"
    _run("lm_throughput.py", "--rows", "8", "--repeats", "1", "--k", "16", "--out", str(out))
    assert "FactGraSS k=16 per layer" in out.read_text()


def test_scoring_benchmark_runs_tiny(tmp_path):
    out = tmp_path / "scoring.md"
    args = [
        "--rows",
        "3000",
        "--queries",
        "40",
        "--topk",
        "8",
        "--dims",
        "32",
        "--shard-rows",
        "1000",
        "--service-rows",
        "3000",
        "--requests",
        "5",
    ]
    _run("bench_scoring.py", *args, "--out", str(out))
    text = out.read_text()
    assert "| 32 | " in text and "| cached in replica | 5 | " in text
    assert "| streamed from shards | 10 | " in text


def test_store_benchmark_runs_tiny(tmp_path):
    out = tmp_path / "store.md"
    args = [
        "--k",
        "64",
        "--tp-mib",
        "1",
        "--tp-rows",
        "256",
        "--threads",
        "2",
        "--big-gib",
        "0.005",
        "--big-rows",
        "512",
        "--few-shards",
        "2",
        "--queries",
        "4",
    ]
    _run("bench_store.py", *args, "--workdir", str(tmp_path / "work"), "--out", str(out))
    text = out.read_text()
    assert "| seaweedfs | write | " in text and "| seaweedfs | read | " in text


def test_cluster_benchmark_runs_quick(tmp_path):
    out = tmp_path / "cluster.md"
    _run("bench_cluster.py", "--quick", "--out", str(out))
    assert "per-shard" in out.read_text().lower()


def test_lds_benchmark_runs_tiny(tmp_path):
    args = [
        "--n-train",
        "120",
        "--n-query",
        "20",
        "--subsets",
        "4",
        "--seeds",
        "1",
        "--ks",
        "64",
        "--methods",
        "factgrass",
        "--cnn-channels",
        "2,4",
        "--cnn-k",
        "32",
    ]
    prefix = tmp_path / "lds"
    _run("bench_lds.py", *args, "--out", str(tmp_path / "out"), "--results", str(prefix))
    table = (tmp_path / "lds.md").read_text()
    assert "| factgrass | 64 | " in table and "exact (all" in table
    assert "CNN on digits, end to end" in table
