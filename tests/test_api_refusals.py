"""The Python API's refusals: bad arguments, rows and objects are named as the caller
passed them (the argument, the set and its rows), before anything is written where they
can be, and a worker's or the reducer's refusal reaches the caller as itself."""

from __future__ import annotations

import functools
import inspect
import re
import threading

import pytest
import ray
import torch
from torch.utils.data import TensorDataset

import grass_dist as gd
from grass_dist.api import BUILD_SETTINGS
from grass_dist.build import check_keys
from grass_dist.data import digits
from grass_dist.errors import BadRowsError, ConfigError
from grass_dist.models.digits import digits_mlp


@pytest.mark.integration
def test_labels_that_are_no_class_ids_are_refused_not_cut(ray_session, tmp_path):
    # Regression targets given to the default (classification) task: .long() made 1.7 the
    # class 1 and the scores those of other labels, without a word. Whole floats are ids.
    x, y = torch.rand(70, 4), (torch.arange(70) % 3).float()
    y[50] = 1.7
    build = functools.partial(gd.Index.build, torch.nn.Linear(4, 3), k=8, workers=1,
                              overrides=[f"run.output_dir={tmp_path}"])  # fmt: skip
    said = r"data\.train rows \[50\] \(1 of a batch .*label 1\.7 is not a whole number: the "
    with pytest.raises(BadRowsError, match=said + "classification task takes class ids"):
        build(TensorDataset(x, y), store=str(tmp_path / "i"))
    one_hot = torch.nn.functional.one_hot(torch.arange(70) % 3).float()
    with pytest.raises(ConfigError, match=r"row 0 of data\.train .*have shape \[1, 3\], not one "):
        build(TensorDataset(x, one_hot), store=str(tmp_path / "j"))
    y[50] = 1.0
    assert build(TensorDataset(x, y), store=str(tmp_path / "k")).summary["index"]["rows"] == 70


@pytest.mark.integration
def test_a_workers_refusal_reaches_the_caller_as_itself(ray_session, tmp_path):
    # Ray wraps a worker's exception in RayTaskError, whose text is the worker's traceback.
    model = digits_mlp(hidden=[8], epochs=0, n_train=40, n_query=5, cache_dir=str(tmp_path))
    x, y = torch.rand(70, 64), torch.randint(0, 10, (70,))
    y[50] = 12  # a label outside the model's 10 classes, past row 0 (which prepare checks)
    with pytest.raises(BadRowsError) as info:
        gd.Index.build(model, TensorDataset(x, y), store=str(tmp_path / "i"), k=8, workers=1,
                       overrides=[f"run.output_dir={tmp_path}"])  # fmt: skip
    said = str(info.value)
    assert type(info.value) is BadRowsError
    said_rows = r"loss of data\.train rows \[50\] \(1 of a batch of \d+, each failing on its own\)"
    assert re.search(said_rows, said)
    assert "IndexError: Target 12 is out of bounds. Check these rows" in said

    # Raised in a Ray task of the reducer actor (wrapped twice): 610 gradient dimensions, 40
    # rows, no damping. The message names the argument as well as the config key.
    index = gd.Index.build(model, TensorDataset(x[:40], y[:40]), store=str(tmp_path / "j"),
                           compression="identity", workers=1,
                           overrides=[f"run.output_dir={tmp_path}"])  # fmt: skip
    y_query = y[:3].clone()
    y_query[1] = 12  # the query set's own rows are named as its
    with pytest.raises(BadRowsError, match=r"loss of data\.query rows \[1\] \(1 of a batch of 3"):
        index.attribute(TensorDataset(x[:3], y_query), damping=1.0)
    with pytest.raises(ConfigError) as info:
        index.attribute(TensorDataset(x[:3], y[:3]), damping=0.0)
    assert type(info.value) is ConfigError
    assert str(info.value).startswith("the preconditioner is singular at this damping")
    assert str(info.value).endswith("(in the Python API: damping= sets precondition.damping)")


class _Locked(torch.nn.Linear):
    def __init__(self) -> None:
        super().__init__(4, 3)
        self.lock = threading.Lock()  # state no pickle can hold


class _LockedData(TensorDataset):
    def __init__(self, *tensors: torch.Tensor) -> None:
        super().__init__(*tensors)
        self.lock = threading.Lock()


@pytest.mark.integration
def test_an_object_that_cannot_be_pickled_is_refused_naming_the_argument(ray_session, tmp_path):
    train = TensorDataset(torch.rand(8, 4), torch.arange(8) % 3)
    said = r"^model: the [\w.]*test_api_refusals\._Locked you passed cannot be copied or "
    with pytest.raises(ConfigError, match=said + r"pickled \(TypeError: cannot pickle"):
        gd.Index.build(_Locked(), train, store=str(tmp_path / "i"))
    locked = _LockedData(torch.rand(8, 4), torch.arange(8) % 3)
    with pytest.raises(ConfigError, match=r"the [\w.]*test_api_refusals\._LockedData you passed "
                       r"cannot be copied or pickled"):  # fmt: skip
        gd.Index.build(
            torch.nn.Linear(4, 3),
            locked,
            store=str(tmp_path / "j"),
            workers=1,
            overrides=[f"run.output_dir={tmp_path}", "cluster.driver_shard=false"],
        )
    # The driver indexes a small set itself, which needs no pickling: built.
    built = gd.Index.build(torch.nn.Linear(4, 3), locked, store=str(tmp_path / "k"), workers=1,
                           overrides=[f"run.output_dir={tmp_path}"])  # fmt: skip
    assert built.summary["index"]["driver_shards"] == 1


def test_a_model_with_nan_weights_is_refused_naming_them_before_anything_is_written(tmp_path):
    # Not "rows [0..9] and 54 more (64 of a batch of 64)" from a worker, as if the data were bad.
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        model[2].weight[1, 1] = float("nan")
    train = TensorDataset(torch.rand(8, 4), torch.arange(8) % 3)
    ray_before = ray.is_initialized()  # the module's tests share one Ray once it started
    said = r"^the model you passed \(a [\w.]*Sequential\) has NaN or inf weights in 2\.weight: "
    with pytest.raises(ConfigError, match=said + r".* Fix: load the checkpoint"):
        gd.Index.build(model, train, store=str(tmp_path / "i"), workers=1,
                       overrides=[f"run.output_dir={tmp_path}"])  # fmt: skip
    assert not (tmp_path / "i").exists()
    assert ray.is_initialized() == ray_before


def test_a_misspelt_argument_or_a_path_for_the_model_is_named_as_the_caller_wrote_it(tmp_path):
    # Not "job_config() got an unexpected keyword argument", nor "model._target_=
    # 'grass_dist.assembly.in_memory' returned an object of type str".
    model, train = torch.nn.Linear(4, 3), TensorDataset(torch.rand(8, 4), torch.arange(8) % 3)
    store = str(tmp_path / "i")
    said = r"^Index\.build\(\) got unexpected keyword arguments \['kk'\] \(did you mean k\?\); "
    with pytest.raises(TypeError, match=said + "it takes model, train and task, "):
        gd.Index.build(model, train, store=store, kk=8)
    with pytest.raises(ConfigError, match=r"^model is the str 'my_pkg\.MLP': give the object"):
        gd.Index.build("my_pkg.MLP", train, store=store)
    # An index is opened by building it again, not by its path; help() shows how.
    with pytest.raises(TypeError, match=r"not str: to open an index, call Index\.build\("):
        gd.Index(store)
    settings = inspect.signature(gd.Index.build).parameters
    assert list(settings)[:2] == ["model", "train"] and settings["store"].default == "outputs/index"
    assert set(settings) == {"model", "train", *BUILD_SETTINGS}
    empty = TensorDataset(torch.rand(0, 4), torch.zeros(0))
    said = r"^the training set you passed \(a [\w.]*TensorDataset\) is empty \(0 rows\)$"
    with pytest.raises(ConfigError, match=said):
        gd.Index.build(model, empty, store=store)
    unlabelled = TensorDataset(torch.rand(8, 4))
    with pytest.raises(ConfigError, match=r"TypeError: the items are not \(input, label\) pairs"):
        gd.Index.build(model, unlabelled, store=store)
    no_class = TensorDataset(torch.rand(8, 4), torch.full((8,), 3))
    said = r"IndexError: Target 3 is out of bounds\. Check that data\.train returns the items"
    with pytest.raises(ConfigError, match=said):
        gd.Index.build(model, no_class, store=store)
    assert not (tmp_path / "i").exists()


def test_config_errors_name_the_arguments_that_set_their_keys(tmp_path):
    model, train = torch.nn.Linear(4, 3), TensorDataset(torch.rand(8, 4), torch.arange(8) % 3)
    store = str(tmp_path / "i")
    with pytest.raises(ConfigError, match=r"at least 1\n\(in the Python API: workers= sets "):
        gd.Index.build(model, train, store=store, workers=0)
    with pytest.raises(ConfigError, match=r"(?s)compression\.k\)\..*\(in the Python API: k= sets"):
        gd.Index.build(model, train, store=store, k=2.5)
    assert not (tmp_path / "i").exists()


def test_every_error_that_names_a_config_key_names_its_argument_too():
    # Not only ConfigError: damping=auto's refusal of regression targets names
    # precondition.damping, which `damping=` sets.
    from grass_dist.api import _own_errors
    from grass_dist.errors import DampingSelectionError

    with pytest.raises(DampingSelectionError) as info, _own_errors():
        raise DampingSelectionError("the labels are not whole numbers: set precondition.damping")
    assert str(info.value).endswith("(in the Python API: damping= sets precondition.damping)")


def test_overrides_given_as_one_string_are_refused_with_the_list_to_give(tmp_path):
    # A string is a sequence too: each of its characters was refused as a setting.
    model, train = torch.nn.Linear(4, 3), TensorDataset(torch.rand(8, 4), torch.arange(8) % 3)
    with pytest.raises(ConfigError) as refused:
        gd.Index.build(model, train, store=str(tmp_path / "i"), overrides="index.shard_size=4")
    assert str(refused.value).startswith(
        "overrides='index.shard_size=4': give a list of 'key=value' strings, e.g. "
        "overrides=['index.shard_size=4']"
    )
    with pytest.raises(ConfigError, match=r"overrides=\['index.shard_size'\]: give a list of"):
        gd.Index.build(model, train, store=str(tmp_path / "i"), overrides=["index.shard_size"])
    assert not (tmp_path / "i").exists()


def test_token_items_given_to_the_default_task_point_to_the_language_model_task(tmp_path):
    # A causal LM's items built without task=: the classification task's error alone said
    # only which fields it lacks.
    items = [{"input_ids": torch.arange(8), "labels": torch.arange(8)} for _ in range(6)]
    with pytest.raises(ConfigError) as refused:
        gd.Index.build(torch.nn.Embedding(8, 4), items, store=str(tmp_path / "i"), workers=1)
    said = str(refused.value)
    assert "got ['input_ids', 'labels'] (token ids: a language model's items, which the " in said
    assert "in Python task=causal_lm() from grass_dist.tasks_lm)" in said
    assert not (tmp_path / "i").exists()


def test_a_dataset_passed_as_the_model_is_named_so(tmp_path):
    model, train = torch.nn.Linear(4, 3), TensorDataset(torch.rand(8, 4), torch.arange(8) % 3)
    with pytest.raises(ConfigError) as refused:
        gd.Index.build(train, model, store=str(tmp_path / "i"), workers=1)
    assert str(refused.value).startswith(
        "the model you passed is of type TensorDataset, not a torch nn.Module: a dataset? "
        "Index.build takes the model first, then train"
    )
    assert "grass_dist.assembly" not in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        gd.Index.build(object(), train, store=str(tmp_path / "i"), workers=1)
    assert str(refused.value).startswith(
        "the model you passed is of type object, not a torch nn.Module: pass the trained "
        "nn.Module to attribute"
    )


def test_workers_the_callers_ray_could_never_place_are_refused_before_the_index(tmp_path):
    # The Ray Index.build would start has this machine's CPUs, and no 64 (nor has the one
    # the module's earlier tests may have started): refused before the store or a Ray.
    ray_before = ray.is_initialized()
    store = tmp_path / "index"
    said = r"cluster\.cpus_per_worker=64 asks each worker for 64 CPU, more than the embedded Ray"
    with pytest.raises(ConfigError, match=said):
        gd.Index.build(
            digits_mlp(hidden=[8], epochs=0, n_train=40, n_query=5, cache_dir=str(tmp_path)),
            digits("train", n_train=40, n_query=5),
            store=store,
            overrides=["cluster.cpus_per_worker=64"],
        )
    assert not store.exists()
    assert ray.is_initialized() == ray_before


class _Keyed(TensorDataset):
    """A user's dataset whose rows go by its own keys."""

    def __init__(self, keys, *tensors: torch.Tensor) -> None:
        super().__init__(*tensors)
        self.keys = keys


class _Overcounted(TensorDataset):
    """len() says more rows than __getitem__ has."""

    def __len__(self) -> int:
        return super().__len__() + 3


def test_training_sets_that_cannot_be_read_row_by_row_are_refused_naming_why(tmp_path):
    # Raised before: TypeError (cannot pickle 'generator'), IndexError, KeyError: 0, and for
    # keys, an IndexError in a worker after the index was created (or, for keys alike, a
    # top-k that named every row the same).
    x, y = torch.rand(12, 4), torch.arange(12) % 3
    pandas = pytest.importorskip("pandas")
    cases = [
        ((row for row in TensorDataset(x, y)), r"is an iterator \(a generator\?\), which can be "),
        (_Overcounted(x, y), r"row 12 of the _Overcounted you passed could not be read \("),
        (pandas.DataFrame({"a": [1.0, 2.0], "b": [0, 1]}), r"KeyError: 0\).*indexed by column"),
        (_Keyed([f"r{i}" for i in range(10)], x, y), r"data\.train has 12 rows but 10 keys: "),
        (_Keyed(["a"] * 12, x, y), r"rows 0 and 1 both have key 'a' \(results name training"),
    ]
    for train, said in cases:
        store = tmp_path / "i"
        with pytest.raises(ConfigError, match=said) as refused:
            gd.Index.build(torch.nn.Linear(4, 3), train, store=str(store), k=8, workers=1)
        assert "data.train" in str(refused.value)  # the argument, by the key it sets
        assert not store.exists()
    check_keys(_Keyed([f"r{i}" for i in range(12)], x, y), "train")  # one key per row: kept
    check_keys(_Keyed(range(12), x, y), "train")


def test_items_the_default_task_cannot_read_say_what_to_give_instead(tmp_path):
    # Raised before: "collates to a list of 1" for an array of rows (it was a Tensor),
    # IndexError for token lists, "too many dimensions 'str'" for class names.
    x = torch.rand(12, 4)
    cases = [
        (torch.nn.Linear(4, 3), x.numpy(), r"collates to a Tensor\) \(rows of one array or "
         r"tensor: give inputs and labels as TensorDataset\(inputs, labels\)\)"),
        (torch.nn.Embedding(8, 4), [[1, 2, 3, 4, 5]] * 12, r"lists of 5 integers, not \(input, "
         r"label\) pairs: token ids\? .*task=causal_lm\(\) from grass_dist\.tasks_lm"),
        (torch.nn.Linear(4, 3), [(row, "cat") for row in x], r"the labels are strings \('cat'\): "
         r"the classification task takes class ids"),
    ]  # fmt: skip
    for model, train, said in cases:
        with pytest.raises(ConfigError, match=said):
            gd.Index.build(model, train, store=str(tmp_path / "i"), k=8, workers=1)
        assert not (tmp_path / "i").exists()
