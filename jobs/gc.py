"""Remove shard attempt files that no manifest version lists (killed or retried attempts), and
scoring runs under results/ that never completed.

python -m jobs.gc                                   # unchanged for gc.grace_s (an hour)
python -m jobs.gc gc.dry_run=true gc.grace_s=600    # report what would go, remove nothing

Prints a JSON summary: files listed, kept (committed, young) and removed, bytes reclaimed.
"""

import hydra
from omegaconf import DictConfig

from grass_dist import launch, run
from grass_dist.config import register_configs


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run.gc(cfg)


if __name__ == "__main__":
    register_configs()
    launch.cli(main)
