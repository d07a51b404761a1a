"""Every shipped compression preset composes, validates and builds compressors."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from grass_dist.compress import build_compressors, compressor_class
from grass_dist.config import JobConfig
from grass_dist.gradients.capture import resolve_layers
from tests.conftest import CONF, compose_cfg
from tests.helpers import ConvNet

PRESETS = sorted(p.stem for p in Path(CONF, "compression").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_compression_preset_validates_and_builds(tmp_path, preset):
    cfg = compose_cfg(tmp_path, f"compression={preset}", "compression.k=8")
    job = JobConfig.from_cfg(OmegaConf.to_container(cfg, resolve=True))
    assert job.compression.method == preset
    if compressor_class(preset).learned:
        return  # fitted on training gradients: covered by tests/compress/test_selective.py
    comps = build_compressors(job.compression, resolve_layers(ConvNet(), ["conv", "head"]))
    assert {c.out_dim for c in comps.values()} <= {8, 30, 84}


def test_cnn_model_preset_validates(tmp_path):
    cfg = compose_cfg(
        tmp_path, "model=digits_cnn", "index.layers=[conv1,conv2,fc1,out]", small=False
    )
    job = JobConfig.from_cfg(OmegaConf.to_container(cfg, resolve=True))
    assert job.model["_target_"] == "grass_dist.models.digits_cnn"
    assert job.index.layers == ["conv1", "conv2", "fc1", "out"]
