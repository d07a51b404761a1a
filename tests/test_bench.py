"""The benchmark scripts run end to end at tiny sizes (their numbers are not checked here)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, args: str, *extra: str) -> str:
    """Run bench/`script` with `args` (written as on a command line) and `extra` verbatim."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args.split(), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _table(tmp_path: Path, script: str, args: str, *extra: str) -> str:
    """Run `script` with `--out` in tmp_path; the results file it wrote."""
    out = tmp_path / (Path(script).stem + ".md")
    _run(script, args, *extra, "--out", str(out))
    return out.read_text()


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    table = _table(tmp_path, "bench_gpu.py", "--tiny --reps 1")
    for method in ("plain fwd+bwd", "grass_dist factgrass", "grass_dist logra"):
        assert f"| {method} | " in table
    assert "bf16, sequence 32, batch 2, 14 Linear layers" in table


def test_breakdown_phases_reproduce_compress(tmp_path):
    # The script raises if its phase-by-phase FactGraSS differs from compress() by one bit.
    args = "--model mlp --batch 16 --k 256 --shard-batches 2 --reps 1"
    assert "| SJLT | " in _table(tmp_path, "bench_breakdown.py", args)


def test_compressor_benchmark_runs_tiny(tmp_path):
    args = "--d-in 32 --d-out 32 --k 16 --batch 4 --seq 1 4 --reps 1"
    assert "| 4 | factgrass | " in _table(tmp_path, "bench_compressors.py", args)


def test_index_throughput_benchmark_runs_tiny(tmp_path):
    args = "--k 64 --mlp-batch 8 --gpt-batch 1 --reps 1 --dattri off"
    table = _table(tmp_path, "bench_index_throughput.py", args)
    for model in ("mlp", "gpt"):
        assert f"| {model} | 64 | " in table and "grass_dist factgrass" in table


def test_content_fingerprint_benchmark_runs_tiny(tmp_path):
    args = "--models mlp --k 64 --reps 1 --check-rows 600"
    table = _table(tmp_path, "bench_content_fingerprint.py", args)
    assert "| mlp | 512 | 64 | digests alone | " in table
    assert "| mlp | 512 | 64 | resume check (600 rows) | " in table


def test_lm_throughput_benchmark_runs_tiny(tmp_path):
    table = _table(tmp_path, "lm_throughput.py", "--rows 8 --repeats 1 --k 16")
    assert "FactGraSS k=16 per layer" in table


def test_scoring_benchmark_runs_tiny(tmp_path):
    args = "--rows 3000 --queries 40 --topk 8 --dims 32 --shard-rows 1000 --service-rows 3000"
    text = _table(tmp_path, "bench_scoring.py", args + " --requests 5")
    assert "| 32 | " in text and "| cached in replica | 5 | " in text
    assert "| streamed from shards | 10 | " in text


def test_store_benchmark_runs_tiny(tmp_path):
    args = "--k 64 --tp-mib 1 --tp-rows 256 --threads 2 --big-gib 0.005 --big-rows 512"
    extra = ["--few-shards", "2", "--queries", "4", "--workdir", str(tmp_path / "work")]
    text = _table(tmp_path, "bench_store.py", args, *extra)
    assert "| seaweedfs | write | " in text and "| seaweedfs | read | " in text


def test_commit_benchmark_runs_tiny(tmp_path):
    args = "--sizes 10 200 --commits 20 --checkpoint-every 10 --before-commits 2"
    assert "| 200 | " in _table(tmp_path, "bench_commit.py", args)


def test_cluster_benchmark_runs_tiny(tmp_path):
    text = _table(tmp_path, "bench_cluster.py", "--tiny")
    assert "| 512 | " in text and "## Scaling model" in text


def test_lds_benchmark_runs_tiny(tmp_path):
    args = "--n-train 120 --n-query 20 --subsets 4 --seeds 1 --ks 64 --methods factgrass"
    extra = ["--cnn-channels", "2,4", "--cnn-k", "32", "--out", str(tmp_path / "out")]
    _run("bench_lds.py", args, *extra, "--results", str(tmp_path / "lds"))
    table = (tmp_path / "lds.md").read_text()
    assert "| factgrass | 64 | " in table and "exact (all" in table
    assert "CNN on digits, end to end" in table


def test_scorer_memory_benchmark_runs_tiny(tmp_path):
    args = "--sizes 2000 6000 --queries 8 --topk 4 --dims 8 --shard-rows 1000 --cpus 1 --check 2"
    text = _table(tmp_path, "bench_scorer_memory.py", args, "--workdir", str(tmp_path))
    assert "| 2000 | 2 | " in text and "| 6000 | 6 | " in text and "Peak PSS ratio" in text


def test_precondition_benchmark_runs_tiny(tmp_path):
    text = _table(tmp_path, "bench_precondition.py", "--tiny")
    assert "| 64 | 4 | " in text and "eigh / Cholesky" in text


def test_job_vs_dattri_benchmark_runs_tiny(tmp_path):
    # dattri off: its environment is optional (bench/dattri_env.sh) and slow to start.
    table = _table(tmp_path, "bench_job_vs_dattri.py", "--tiny --dattri off")
    assert "| grass_dist | " in table
    for stage in ("index", "precondition", "score"):
        assert f"| {stage} | " in table


def test_vs_bergson_benchmark_runs_tiny(tmp_path):
    # Whole processes on a 2-block GPT-2 and 8 documents; bergson only where its venv exists.
    text = _table(tmp_path, "bench_vs_bergson.py", "--tiny --repeats 1 --layouts 1x2")
    assert "| 1x2 | grass_dist | " in text and "identical token ids on both sides" in text
    assert "| 1x2 | floor | " in text and "forward+backward loop" in text
    if (ROOT / ".venv-bergson" / "bin" / "python").exists():
        assert "| 1x2 | bergson | " in text
    else:
        assert "bash bench/bergson_env.sh" in text


def test_first_shard_benchmark_runs_tiny(tmp_path):
    # One job is enough to run the script end to end; its other job differs in overrides only.
    table = _table(tmp_path, "bench_first_shard.py", "--tiny --repeats 1 --jobs digits")
    row = next(
        line for line in table.splitlines() if line.startswith("| digits | ") and "of 1" in line
    )
    timeline = [line for line in table.splitlines() if line.startswith("| digits | ")][-1]
    first, prepared = float(row.split("|")[2]), float(timeline.split("|")[2])
    assert 0 < prepared < first  # the summary's startup_seconds reached the table


def test_refusals_benchmark_runs_tiny(tmp_path):
    # The script exits non-zero unless each case exits 2, says why and leaves its store alone.
    table = _table(tmp_path, "bench_refusals.py", "--repeats 1 --cases config placement")
    placement = next(line for line in table.splitlines() if line.startswith("| placement | "))
    assert placement.endswith("| 0 of 1 |")  # refused before the embedded Ray started


def test_api_attribute_benchmark_runs_tiny(tmp_path):
    # The script exits non-zero if its kinds of call score differently.
    table = _table(tmp_path, "bench_api_attribute.py", "--tiny")
    assert all(f"| {call} | " in table for call in ("before", "kept reducer", "now"))


def test_read_results_benchmark_runs_tiny(tmp_path):
    table = _table(tmp_path, "bench_read_results.py", "--tiny")
    for read in ("top-k", "dense"):
        assert f"| README's {read} read | " in table
        assert f"| README's {read} read, torch imported first | " in table


def test_fast_paths_benchmark_runs_tiny(tmp_path):
    text = _table(tmp_path, "bench_fast_paths.py", "--tiny --rounds 1 --profile")
    assert "| fast paths |" in text and "| usual path |" in text and "`aten::" in text
    assert "| fast paths, 2 lanes of 1 thread |" in text
    assert "| fast paths, 2 lanes of 1 thread, PyTorch's kernels for the C loops |" in text
