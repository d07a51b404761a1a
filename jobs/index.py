"""Build (or resume) the gradient index only.

python -m jobs.index [hydra overrides]
python -m jobs.index index.repair=true    # check every committed shard, recompute bad ones
"""

import hydra
from omegaconf import DictConfig

from grass_dist import launch
from grass_dist.config import register_configs


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    launch.door("index", cfg)


if __name__ == "__main__":
    register_configs()
    launch.cli(main)
