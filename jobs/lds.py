"""Linear datamodeling score: build (or load) the ground truth, evaluate dense result sets.

python -m jobs.lds [hydra overrides]
python -m jobs.attribute scoring.dense=true && python -m jobs.lds lds.subsets=50 lds.seeds=3
"""

import hydra
from omegaconf import DictConfig

from grass_dist import launch, run
from grass_dist.config import register_configs


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run.lds(cfg)


if __name__ == "__main__":
    register_configs()
    launch.cli(main)
