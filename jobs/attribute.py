"""Run every stage: gradient index, preconditioner, scores, report.

python -m jobs.attribute [hydra overrides]
"""

import hydra
from omegaconf import DictConfig

from grass_dist import launch
from grass_dist.config import register_configs


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    launch.door("attribute", cfg)


if __name__ == "__main__":
    register_configs()
    launch.cli(main)
