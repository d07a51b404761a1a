"""Shared fixtures: Hydra composition of the shipped configs and one Ray per test module."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Tests that press Ctrl-C send SIGINT to processes they start, as a terminal would. A suite
# started in the background by a non-interactive shell (`make test &`, nohup) inherits SIGINT
# ignored, and an ignored signal stays ignored across exec, so those processes would never
# see the Ctrl-C. Give the children a terminal's default disposition.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Small enough for a 2-core CI machine, big enough to span several shards.
SMALL = [
    "data.train.n_train=90",
    "data.train.n_query=12",
    "model.hidden=[16]",
    "model.epochs=8",
    "index.shard_size=32",
    "index.batch_size=16",
    "cluster.cpus_per_worker=0.5",
    "compression.k=32",
]


def compose_cfg(tmp_path: Path, *overrides: str, small: bool = True):
    # Imported here, not at the top: a GPU machine runs tests/test_cuda.py without Hydra.
    from hydra import compose, initialize_config_dir

    from grass_dist.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"run.output_dir={tmp_path}", *(SMALL if small else []), *overrides],
        )


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()
