"""Learned compressor states of indexes written before states were content-addressed."""

from __future__ import annotations

import hashlib

import pytest

from grass_dist.errors import CorruptIndexError
from grass_dist.gradients import learned_state
from grass_dist.index import GradientIndex


def _index(tmp_path, state: bytes) -> GradientIndex:
    sha = hashlib.sha256(state).hexdigest()
    fp = {"format_version": 1, "layers": [{"name": "fc1", "method": "selective_mask", "k": 4}]}
    fp["layers"][0]["state_sha256"] = sha
    return GradientIndex.create_or_open(str(tmp_path / "idx"), fp)


def test_a_state_under_its_old_name_loads_when_its_sha256_matches(tmp_path):
    index = _index(tmp_path, b"mask bytes")
    index.put_artifact("compressors/fc1.safetensors", b"mask bytes")
    assert learned_state.load_states(index, ["fc1"]) == {"fc1": b"mask bytes"}


def test_a_state_under_its_old_name_is_still_held_to_the_fingerprint(tmp_path):
    index = _index(tmp_path, b"mask bytes")
    index.put_artifact("compressors/fc1.safetensors", b"other bytes")
    with pytest.raises(CorruptIndexError, match="does not match the sha256"):
        learned_state.load_states(index, ["fc1"])
