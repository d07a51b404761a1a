"""The LDS retraining recipe: the user's `lds.train` callable, checked before any Ray task,
given a Subset of the training data and a seed, and part of the ground truth's digest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from grass_dist.config import JobConfig
from grass_dist.errors import ConfigError
from grass_dist.fidelity import ground_truth, retrain
from tests.conftest import compose_cfg

HERE = "tests.lds.test_retrain"


def fit(dataset, seed, width=4):
    """A recipe that trains nothing and remembers what it was given."""
    model = nn.Linear(64, width)
    model.given = (dataset, seed, width)
    return model.train()


def fit_needs_lr(dataset, seed, lr):
    return nn.Linear(64, 10)


def fit_one_argument(dataset):
    return nn.Linear(64, 10)


def fit_without_seed(dataset, epochs=5):
    return nn.Linear(64, 10)


def not_a_model(dataset, seed):
    return "weights.pt"


def _job(tmp_path, *overrides: str) -> JobConfig:
    return JobConfig.from_cfg(compose_cfg(tmp_path, *overrides))


def test_the_recipe_gets_a_subset_of_the_training_data_a_seed_and_its_arguments(tmp_path):
    job = _job(tmp_path, f"+lds.train._target_={HERE}.fit", "+lds.train.width=3")
    retrain.check(job)
    model = retrain.retrainer(job)([5, 1, 7], 11)
    dataset, seed, width = model.given
    assert isinstance(dataset, Subset) and list(dataset.indices) == [5, 1, 7]
    assert len(dataset.dataset) == 90  # tests.conftest.SMALL: data.train.n_train=90
    torch.testing.assert_close(dataset[1][0], dataset.dataset[1][0])
    assert (seed, width) == (11, 3) and not model.training  # outputs are read in eval mode


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ([f"+lds.train._target_={HERE}.fit", "+lds.train.widht=3"], r"takes no argument widht"),
        ([f"+lds.train._target_={HERE}.fit", "+lds.train.widht=3"], r"~lds\.train\.widht"),
        ([f"+lds.train._target_={HERE}.fit_needs_lr"], r"needs argument lr: add \+lds.train.lr="),
        ([f"+lds.train._target_={HERE}.fit_one_argument"], r"fn\(dataset, seed, \*\*args\)"),
        ([f"+lds.train._target_={HERE}.fit_without_seed"], r"seed as its argument 'epochs'"),
        ([f"+lds.train._target_={HERE}.nowhere"], r"lds.train._target_=.* cannot be imported"),
    ],
)
def test_a_recipe_that_cannot_run_is_refused_before_any_retraining(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        retrain.check(_job(tmp_path, *overrides))


def test_a_model_without_a_built_in_recipe_needs_one(tmp_path):
    cfg = compose_cfg(tmp_path, "model=custom", "model._target_=my_pkg.models.load", small=False)
    with pytest.raises(ConfigError, match=r"give yours with \+lds.train._target_=my_pkg"):
        retrain.check(JobConfig.from_cfg(cfg))


def test_a_recipe_without_target_or_returning_no_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"lds.train=.* needs a _target_"):
        _job(tmp_path, "+lds.train.epochs=3")
    job = _job(tmp_path, f"+lds.train._target_={HERE}.not_a_model")
    with pytest.raises(ConfigError, match="returned a str, not an nn.Module"):
        retrain.retrainer(job)([0, 1], 0)


def test_the_recipe_is_part_of_the_ground_truths_digest(tmp_path):
    builtin = ground_truth.recipe(_job(tmp_path))
    assert "recipe" not in builtin  # built-in recipes keep the digests they always had
    mine = ground_truth.recipe(_job(tmp_path, f"+lds.train._target_={HERE}.fit"))
    wider = ground_truth.recipe(
        _job(tmp_path, f"+lds.train._target_={HERE}.fit", "+lds.train.width=8")
    )
    digests = {ground_truth.digest(s) for s in (builtin, mine, wider)}
    assert len(digests) == 3


class LossOnly:
    """A user's task that defines only its loss: no logits, no split."""

    def collate(self, items):
        return torch.utils.data.default_collate(items)

    def per_sample_loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def test_outputs_of_a_loss_only_task_are_read_from_input_label_items():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 64, generator=gen), torch.randint(0, 10, (7,), generator=gen)
    model = nn.Linear(64, 10)
    got = ground_truth.model_outputs(model, LossOnly(), TensorDataset(x, y), "logprob")
    with torch.no_grad():
        want = torch.log_softmax(model(x).double(), 1)[torch.arange(7), y].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_lds_results_none_of_which_exists_are_refused_before_any_retraining(tmp_path, monkeypatch):
    # It retrained the ground truth (minutes at the defaults), then skipped every result set
    # and exited 0. Unset, jobs.lds may still build the ground truth alone.
    from grass_dist.errors import ResultsNotFoundError
    from grass_dist.fidelity import evaluate

    def no_retraining(*args, **kwargs):
        raise AssertionError("went on to build the ground truth")

    monkeypatch.setattr(evaluate.ground_truth, "ensure", no_retraining)
    monkeypatch.setattr(evaluate, "connect", no_retraining)
    said = r"lds\.results=\['nosuch'\] names no result set this job can evaluate \('nosuch': no "
    with pytest.raises(ResultsNotFoundError, match=said + r"complete results named 'nosuch'"):
        evaluate.lds(compose_cfg(tmp_path, "lds.results=[nosuch]"))
    with pytest.raises(AssertionError, match="went on to build the ground truth"):
        evaluate.lds(compose_cfg(tmp_path))  # default [run.name]: on to the ground truth
