"""Run every stage: gradient index, preconditioner, scores, report.

python -m jobs.attribute [hydra overrides]
"""

import hydra
from omegaconf import DictConfig

from grass_dist import run


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run.attribute(cfg)


if __name__ == "__main__":
    run.cli(main)
