# grass_dist: `make run` sets everything up and runs the default attribution job;
# `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU-only machines get the CPU wheel of torch (an unpinned torch pulls a CUDA build).
TORCH ?= torch==2.13.0

.PHONY: run test lint clean

# Set-up talks on stderr and the job prints its summary alone on stdout: `make run | jq .index`.
$(STAMP): pyproject.toml
	@echo "setting up $(VENV): python, pip, $(TORCH), grass_dist[test]" >&2
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) >&2
	@$(PY) -m pip install -q --upgrade pip >&2
	@$(PY) -m pip install -q "$(TORCH)" >&2
	@$(PY) -m pip install -q -e ".[test]" >&2
	@touch $(STAMP)

run: $(STAMP)
	@$(PY) -m jobs.attribute $(ARGS)

# The suite runs on TEST_WORKERS processes, one test file each at a time (a file's tests
# share its Ray).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs .pytest_cache .ruff_cache
