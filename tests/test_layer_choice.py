"""Which layers a job attributes: judged by running the model on row 0 before anything is
written, so that the default leaves out Linear layers the factorised capture cannot see,
and a named layer that does not run once is refused before the index exists."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import grass_dist as gd
from grass_dist import pipeline
from grass_dist.api import job_config
from grass_dist.errors import ConfigError
from grass_dist.gradients.capture import layers_that_run
from grass_dist.gradients.computer import module_calls
from grass_dist.tasks.classifier import ClassificationTask
from tests.helpers import AttnNet, ConvNet, TwiceNet

TASK = ClassificationTask()


def _attn_data(n: int = 40):
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, 4, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    )


def _calls(model, x):
    return module_calls(model, TASK, (x, torch.tensor(0)))


def test_the_default_leaves_out_linear_layers_that_do_not_run_once(caplog):
    model = AttnNet()
    calls = _calls(model, torch.randn(4, 8))
    with caplog.at_level(logging.WARNING, logger="grass_dist"):
        assert layers_that_run(model, None, calls) == ["enc.linear1", "enc.linear2", "head"]
    assert "['enc.self_attn.out_proj'] (calls: [0])" in caplog.text
    assert "(e.g. ['enc.self_attn'])" in caplog.text  # the module that holds its weight
    # Named, it is refused; its enclosing module is taken whole (per-sample gradients).
    with pytest.raises(ConfigError, match=r"\['enc.self_attn.out_proj'\] did not run"):
        layers_that_run(model, ["enc.self_attn.out_proj", "head"], calls)
    assert layers_that_run(model, ["enc.self_attn", "head"], calls) == ["enc.self_attn", "head"]

    twice = TwiceNet()
    calls = _calls(twice, torch.randn(6))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grass_dist"):
        assert layers_that_run(twice, None, calls) == ["head"]
    assert "['block'] (calls: [2])" in caplog.text
    with pytest.raises(ConfigError, match="layer 'block' ran twice"):
        layers_that_run(twice, ["block", "head"], calls)


def test_layers_that_hold_the_same_parameters_are_refused():
    model = AttnNet()
    calls = _calls(model, torch.randn(4, 8))
    with pytest.raises(ConfigError, match=r"'enc' and 'enc.linear1'.*'enc.linear1' lies inside"):
        layers_that_run(model, ["enc", "enc.linear1"], calls)
    with pytest.raises(ConfigError, match="counted twice"):
        layers_that_run(model, ["enc.linear2", "enc"], calls)


def test_a_named_layer_that_does_not_run_is_refused_before_the_index_is_written(tmp_path):
    store = tmp_path / "index"
    named = ["index.layers=[enc.self_attn.out_proj,head]"]
    with pytest.raises(ConfigError, match="did not run in the forward pass"):
        pipeline.prepare(job_config(AttnNet(), _attn_data(), store=str(store), overrides=named))
    assert not store.exists()  # nothing written: the fixed call may use the same store
    job = pipeline.prepare(job_config(AttnNet(), _attn_data(), store=str(store)))
    assert [name for name, _ in job.index.layers] == ["enc.linear1", "enc.linear2", "head"]
    assert job.cfg.index.layers == ["enc.linear1", "enc.linear2", "head"]


@pytest.mark.integration
def test_workers_attribute_the_layers_the_driver_chose(ray_session, tmp_path):
    # index.layers=null: the driver's choice (out_proj left out) is the index's, and the
    # workers, which build their compressors from the index, compute the same rows as a job
    # that names those layers.
    train, query = _attn_data(40), _attn_data(6)
    settings = dict(compression="identity", workers=1, overrides=["index.shard_size=20"])
    default = gd.Index.build(AttnNet(), train, store=str(tmp_path / "default"), **settings)
    assert default.summary["compression"]["layers"] == ["enc.linear1", "enc.linear2", "head"]
    named = gd.Index.build(
        AttnNet(),
        train,
        store=str(tmp_path / "named"),
        compression="identity",
        workers=1,
        overrides=["index.shard_size=20", "index.layers=[enc.linear1,enc.linear2,head]"],
    )
    a = default.attribute(query, dense=True).dense()
    b = named.attribute(query, dense=True).dense()
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    default.close()
    named.close()


def test_a_model_that_is_one_linear_layer_is_its_own_layer():
    model = torch.nn.Linear(4, 3)
    assert layers_that_run(model, None, _calls(model, torch.randn(4))) == [""]


class _Tied(torch.nn.Module):
    """Two Linear layers that share one weight, and an untied head."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = (torch.nn.Linear(4, 4) for _ in range(3))
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.tanh(self.a(x))))


def test_the_default_warns_of_the_convolutions_and_tied_layers_it_leaves_out(caplog):
    # A CNN's user (TRAK, kronfluence attribute convolutions) must hear that index.layers=
    # null attributes only its Linear head; the norm is left out without a word.
    conv = ConvNet()
    x = torch.randn(1, 5, 5)
    with caplog.at_level(logging.WARNING, logger="grass_dist"):
        assert layers_that_run(conv, None, _calls(conv, x)) == ["head"]
    (said,) = [r.getMessage() for r in caplog.records]
    assert "leaves out the convolutions ['conv'] (Conv2d, 18% of the model's parameters)" in said
    assert "index.layers" in said and "norm" not in said
    # Named, they are attributed and nothing is said.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grass_dist"):
        assert layers_that_run(conv, ["conv", "head"], _calls(conv, x)) == ["conv", "head"]
    assert not caplog.records

    tied = _Tied()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grass_dist"):
        assert layers_that_run(tied, None, _calls(tied, torch.randn(4))) == ["head"]
    (said,) = [r.getMessage() for r in caplog.records]
    assert "leaves out Linear layers whose weight another module shares" in said
    assert said.endswith("['a', 'b']")
