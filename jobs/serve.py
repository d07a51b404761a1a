"""Serve attribution queries over a finished index (HTTP on 127.0.0.1 by default).

python -m jobs.serve [hydra overrides], e.g. python -m jobs.serve store.url=/data/index
python -m jobs.serve precondition.damping=auto   # the delta jobs.attribute chose for run.name

Exits 2, before deploying, when the config does not fit the index or the pre-deploy query
fails (see grass_dist.service.app.check).
"""

import hydra
from omegaconf import DictConfig

from grass_dist import launch, run
from grass_dist.config import register_configs


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run.serve(cfg)


if __name__ == "__main__":
    register_configs()
    launch.cli(main)
