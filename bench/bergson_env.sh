#!/usr/bin/env bash
# The benchmark-only environment .venv-bergson for bench/bench_vs_bergson.py: bergson 2.5.1
# (EleutherAI; not a grass_dist dependency) on the CPU torch wheel the Makefile pins.
#   bash bench/bergson_env.sh                       # .venv-bergson at the repo root
#   VENV=/elsewhere/.venv-bergson bash bench/bergson_env.sh
# bergson's newest torchvision pins a newer (CUDA) torch, and PyPI's torchvision for torch 2.13
# is a CUDA build that breaks `import transformers` on the CPU wheel. So torch goes first,
# bergson without its dependencies, then bergson's own requirements (read from its metadata)
# less torchvision, torchaudio and bitsandbytes, with torch held by a constraints file.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-bergson}
TORCH=${TORCH:-torch==2.13.0}
BERGSON=${BERGSON:-bergson==2.5.1}
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH"
"$VENV/bin/python" -m pip install -q --no-deps "$BERGSON"
constraints=$(mktemp)
requirements=$(mktemp)
trap 'rm -f "$constraints" "$requirements"' EXIT
echo "$TORCH" >"$constraints"
"$VENV/bin/python" - >"$requirements" <<'PY'
import importlib.metadata as m
import re

SKIPPED = {"torchvision", "torchaudio", "bitsandbytes"}
for requirement in m.requires("bergson") or []:
    if "extra ==" in requirement:
        continue
    name = re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower()
    if name not in SKIPPED:
        print(requirement)
PY
"$VENV/bin/python" -m pip install -q -c "$constraints" -r "$requirements"
"$VENV/bin/python" -c "
import importlib.metadata as m
for name in ('bergson', 'torch', 'transformers', 'datasets'):
    print(name, m.version(name))
"
