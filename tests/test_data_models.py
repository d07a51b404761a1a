"""The digits splits and the cached digits MLP."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from grass_dist.data import DigitsDataset, digits
from grass_dist.models import digits as zoo
from grass_dist.models.digits import accuracy, digits_mlp
from grass_dist.models.state import state_hash


def test_splits_are_disjoint_sized_and_deterministic():
    train, query = digits("train", 300, 50, seed=3), digits("query", 300, 50, seed=3)
    assert isinstance(train, DigitsDataset)
    assert (len(train), len(query)) == (300, 50)
    assert len(set(train.keys)) == 300 and not set(train.keys) & set(query.keys)
    assert digits("train", 300, 50, seed=3).keys == train.keys
    assert digits("train", 300, 50, seed=4).keys != train.keys
    # The train split does not depend on n_query: the permutation is fixed by the seed.
    assert digits("train", 300, 10, seed=3).keys == train.keys
    assert all(k.startswith("digits/") for k in train.keys)


def test_digits_read_without_scikit_learn_are_load_digits(monkeypatch):
    from sklearn.datasets import load_digits

    # The module, not the function grass_dist.data exports under the same name.
    module = importlib.import_module("grass_dist.data.digits")
    bunch = load_digits()
    module._load.cache_clear()
    pixels, labels = module._load()
    assert np.array_equal(pixels, bunch.data.astype(np.float32)) and pixels.dtype == np.float32
    assert np.array_equal(labels, bunch.target) and labels.dtype == np.int64
    # Where the file is not found, load_digits itself gives the same arrays.
    monkeypatch.setattr(module, "_bundled_csv", lambda: None)
    module._load.cache_clear()
    again = module._load()
    module._load.cache_clear()
    assert np.array_equal(again[0], pixels) and np.array_equal(again[1], labels)
    # Building a split (what the driver and each worker do) leaves scikit-learn unimported.
    code = (
        "import sys; from grass_dist.data import digits; digits('train', 1000, 100); "
        "assert 'sklearn' not in sys.modules, 'sklearn imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_items_and_describe():
    ds = digits("query", 100, 20)
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (64,)
    assert y.dtype == torch.int64 and y.shape == ()
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    assert xs.min() >= 0 and xs.max() <= 1 and xs.max() > 0.9
    assert ds.labels.dtype == np.int64 and set(ds.labels.tolist()) <= set(range(10))
    d = ds.describe(3)
    assert d["key"] == ds.keys[3] and d["label"] == int(ds[3][1]) == ds.labels[3]
    assert d["image"].shape == (8, 8)
    np.testing.assert_allclose(d["image"].ravel(), ds[3][0].numpy())


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"split": "test"}, "split"),
        ({"n_train": 0}, "data.train.n_train"),
        ({"split": "query", "n_query": -1}, "data.query.n_query"),
        ({"n_train": 1700, "n_query": 100}, "data.train.n_train + data.train.n_query"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name.replace("+", r"\+")):
        digits(**kwargs)


def test_digits_mlp_trains_caches_and_reloads(tmp_path, monkeypatch):
    rng_state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    model = digits_mlp(cache_dir=str(tmp_path))
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert torch.get_num_threads() == threads
    assert not model.training
    assert [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)] == [
        "fc1",
        "fc2",
        "out",
    ]
    assert accuracy(model, digits("query")) > 0.9
    cached = list(tmp_path.glob("digits_mlp-*.pt"))
    assert len(cached) == 1 and len(cached[0].stem.split("-")[1]) == 16
    assert not list(tmp_path.glob("*.tmp"))

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model should have been loaded")

    monkeypatch.setattr(zoo, "_train", no_training)
    again = digits_mlp(cache_dir=str(tmp_path))
    assert state_hash(again) == state_hash(model)
    assert not again.training
    with pytest.raises(AssertionError, match="cached"):
        digits_mlp(epochs=1, cache_dir=str(tmp_path))  # other arguments, other cache file


def test_training_is_deterministic(tmp_path):
    a = digits_mlp(hidden=[16], epochs=2, cache_dir=str(tmp_path / "a"))
    b = digits_mlp(hidden=[16], epochs=2, cache_dir=str(tmp_path / "b"))
    c = digits_mlp(hidden=[16], epochs=2, seed=1, cache_dir=str(tmp_path / "c"))
    assert state_hash(a) == state_hash(b) != state_hash(c)


def test_the_initial_weights_are_pytorchs_default_drawn_from_the_generator():
    # The reference: the same meta-built model materialised by `to_empty` (which imports
    # sympy, 0.4-0.9 s of a job's start) and initialised as nn.Linear / nn.Conv2d reset it.
    def reference(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
        model = model.to_empty(device="cpu")
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                torch.nn.init.kaiming_uniform_(module.weight, a=5**0.5, generator=generator)
                bound = 1.0 / module.weight[0].numel() ** 0.5
                torch.nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        return model

    def built(init) -> list[dict[str, torch.Tensor]]:
        real, zoo._init = zoo._init, init
        try:
            mlp = zoo._mlp([32, 16], torch.Generator().manual_seed(3))
            cnn = zoo._cnn([4, 8], 16, torch.Generator().manual_seed(3))
        finally:
            zoo._init = real
        return [mlp.state_dict(), cnn.state_dict()]

    for ours, theirs in zip(built(zoo._init), built(reference), strict=True):
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert all(t.device.type == "cpu" for t in ours.values())
    code = (
        "import sys, torch\n"
        "from grass_dist.models import digits\n"
        "digits._mlp([8], torch.Generator().manual_seed(0))\n"
        "print('sympy' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_state_hash_sees_every_weight(tmp_path):
    model = digits_mlp(hidden=[8], epochs=1, cache_dir=str(tmp_path))
    before = state_hash(model)
    assert len(before) == 64 and state_hash(model) == before
    with torch.no_grad():
        model.out.bias[3] += 1e-6
    assert state_hash(model) != before


def test_train_on_replays_the_builders_recipe(tmp_path):
    node = {
        "_target_": "grass_dist.models.digits_mlp",
        "hidden": [8],
        "epochs": 2,
        "n_train": 60,
        "n_query": 10,
        "seed": 5,
        "cache_dir": str(tmp_path),
    }
    built = zoo.train_on(node, range(60), seed=5)  # all rows, the model's own seed
    kwargs = {k: v for k, v in node.items() if k != "_target_"}
    assert state_hash(built) == state_hash(digits_mlp(**kwargs))
    half = zoo.train_on(node, range(0, 60, 2), seed=5)
    assert state_hash(half) == state_hash(zoo.train_on(node, range(0, 60, 2), seed=5))
    assert state_hash(half) != state_hash(built)
    assert state_hash(zoo.train_on(node, range(0, 60, 2), seed=6)) != state_hash(half)
    cnn = {
        "_target_": "grass_dist.models.digits_cnn",
        "channels": [2],
        "hidden": 4,
        "epochs": 1,
    }
    small_cnn = zoo.train_on({**cnn, "n_train": 40}, range(10), seed=0)
    assert small_cnn(torch.zeros(3, 64)).shape == (3, 10)
    with pytest.raises(ValueError, match="no known training recipe"):
        zoo.train_on({"_target_": "my.model"}, range(3), seed=0)
