"""Importing the library changes no process state: entry points configure, the library obeys.

Every grass_dist module is imported in a fresh interpreter after the third-party packages
it builds on (whose own import-time changes are theirs), and the process must be as before.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = """
import importlib, logging, os, pkgutil

import hydra, ray, ray.serve, torch
from hydra.core.config_store import ConfigStore

try:
    import transformers
except ImportError:
    pass

env, threads = dict(os.environ), torch.get_num_threads()
handlers = list(logging.getLogger().handlers)

import grass_dist

for module in pkgutil.walk_packages(grass_dist.__path__, "grass_dist."):
    importlib.import_module(module.name)

changed = sorted(k for k in {*env, *os.environ} if env.get(k) != os.environ.get(k))
assert not changed, f"environment variables changed at import: {changed}"
assert logging.getLogger().handlers == handlers, "root logging configured at import"
assert torch.get_num_threads() == threads, "torch threads changed at import"
assert "_job_schema.yaml" not in ConfigStore.instance().repo, "registered at import"

from grass_dist.compress.registry import methods

assert "factgrass" in methods() and "selective_mask" in methods()
"""


def test_importing_the_library_leaves_the_process_as_it_was():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
