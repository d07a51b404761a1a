#!/usr/bin/env bash
# Every check that needs a GPU, as one command on a CUDA machine: tests/test_cuda.py (phi on
# CUDA equals phi on the CPU, for every Linear method; bf16), then bench/bench_gpu.py.
#
#   bash bench/gpu_check.sh OUT_DIR     # logs and gpu.md go to OUT_DIR
#
# Copy OUT_DIR/gpu.md to bench/results/gpu.md only from such a real run.
#
# Needs python3 with CUDA torch, numpy, safetensors, pytest (+ pytest-timeout) and omegaconf
# (Ray, Hydra and s3fs are not imported on this path). A machine without omegaconf gets it
# as wheels built beforehand on any machine with pip, into the ignored .whl/:
#   python3 -m pip download --no-deps -d .whl omegaconf==2.3.0
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
# which this script installs into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda:', torch.cuda.is_available())"
status=0
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.log" \
  || status=1
# The benchmark runs even if a test failed: its timings are worth having either way.
timeout 300 python3 bench/bench_gpu.py --out "$out/gpu.md" 2>&1 | tee "$out/bench_gpu.log" \
  || status=1
exit $status
