#!/usr/bin/env bash
# The benchmark-only environment .venv-dattri for bench/bench_index_throughput.py: dattri 0.3.0
# (not a grass_dist dependency), the CPU torch wheel the Makefile pins, and the two small
# packages grass_dist's gradient code imports (pyarrow: through its index), so that one process
# runs both libraries.
#   bash bench/dattri_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-dattri}
TORCH=${TORCH:-torch==2.13.0}
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$TORCH"
"$VENV/bin/python" -m pip install -q dattri==0.3.0 safetensors omegaconf pyarrow
"$VENV/bin/python" -c "import dattri, importlib.metadata as m; print('dattri', m.version('dattri'))"
