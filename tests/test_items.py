"""Keys, labels and descriptions of plain map-style datasets (grass_dist.data.items)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from grass_dist.data import digits, items
from grass_dist.errors import BadRequestError
from grass_dist.tasks.classifier import ClassificationTask


@pytest.fixture(scope="module")
def pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """Six digit images (6, 64) in [0, 1] and their labels (6,)."""
    ds = digits("train", 6, 2)
    return torch.stack([ds[i][0] for i in range(6)]), torch.as_tensor(ds.labels)


def test_tensor_dataset(pixels):
    x, y = pixels
    ds = TensorDataset(x, y)
    d = items.describe(ds, 4)
    assert d["key"] == "4" and items.sample_key(ds, 4) == "4"
    assert d["label"] == int(y[4]) and isinstance(d["label"], int)
    np.testing.assert_allclose(d["image"], x[4].numpy().reshape(8, 8))
    np.testing.assert_array_equal(items.labels(ds), y.numpy())


def test_list_of_tuples_and_dicts(pixels):
    x, y = pixels
    tuples = [(x[i], int(y[i])) for i in range(6)]
    dicts = [{"input": x[i], "label": y[i]} for i in range(6)]
    for ds in (tuples, dicts):
        d = items.describe(ds, 2)
        assert d["key"] == "2" and d["label"] == int(y[2]) and d["image"].shape == (8, 8)
        np.testing.assert_array_equal(items.labels(ds), y.numpy())
    # Unknown field names: the first field that renders is shown, a label field is read.
    row = items.describe([{"sentence": "a <b> c", "y": torch.tensor([3])}], 0)
    assert row == {"key": "0", "label": 3, "text": "a <b> c"}


def test_own_keys_and_describe_win(pixels):
    x, y = pixels

    class Described(TensorDataset):
        keys = [f"k{i}" for i in range(6)]

        def describe(self, i: int) -> dict:
            return {"text": f"row {i}"}  # no key, no label: both come from the dataset

    ds = Described(x, y)
    assert items.describe(ds, 1) == {"text": "row 1", "label": int(y[1]), "key": "k1"}
    assert items.label_of(ds, 5) == int(y[5])


@pytest.mark.parametrize(
    ("value", "shape"),
    [
        (np.full((28, 28), 255, np.uint8), (28, 28)),  # uint8 grey: 255 -> 1
        (torch.rand(1, 12, 10), (12, 10)),  # (1, H, W)
        (torch.rand(3, 16, 16) * 4 - 2, (16, 16, 3)),  # normalised RGB, channels first
        (np.random.default_rng(0).random((9, 7, 4)), (9, 7, 3)),  # RGBA, channels last
        (torch.rand(784), (28, 28)),  # a flat square vector
    ],
)
def test_image_detection(value, shape):
    img = items.image_of(value)
    assert img.shape == shape and img.min() >= 0.0 and img.max() <= 1.0
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        assert img.max() == 1.0


@pytest.mark.parametrize(
    "value",
    [torch.arange(64), torch.rand(10), torch.rand(2, 50), "text", torch.rand(5, 5, 5)],
    ids=["token ids", "non-square vector", "too thin", "string", "3 channels nowhere"],
)
def test_not_images(value):
    assert items.image_of(value) is None


def test_image_range_is_kept_or_scaled():
    faint = torch.full((8, 8), 0.25)
    assert items.image_of(faint).max() == pytest.approx(0.25)  # in [0, 1]: kept
    wide = torch.linspace(-3, 5, 64)
    img = items.image_of(wide)
    assert img.min() == 0.0 and img.max() == 1.0


def test_no_labels():
    lm = [{"input_ids": torch.arange(5), "labels": torch.arange(5)} for _ in range(3)]
    assert items.labels(lm) is None and "label" not in items.describe(lm, 0)
    inputs_only = TensorDataset(torch.rand(4, 3))
    assert items.labels(inputs_only) is None
    d = items.describe(inputs_only, 0)
    assert set(d) == {"key", "text"} and d["text"].startswith("(3,) [")
    half = [(torch.rand(2), 1), (torch.rand(2), torch.rand(3))]  # one row's target is a vector
    assert items.labels(half) is None


def test_dataset_labels_attribute_and_columns():
    class Columns:
        """The parts of a `datasets.Dataset` that labels() uses; rows must not be read."""

        column_names = ["img", "label"]

        def __len__(self) -> int:
            return 3

        def __getitem__(self, i):
            if i == "label":
                return [2, 0, 1]
            raise AssertionError("labels() read a row instead of the label column")

    np.testing.assert_array_equal(items.labels(Columns()), [2, 0, 1])
    ds = digits("query", 6, 4)
    np.testing.assert_array_equal(items.labels(ds), ds.labels)


def test_hugging_face_dataset(pixels):
    datasets = pytest.importorskip("datasets")
    x, y = pixels
    ds = datasets.Dataset.from_dict({"pixels": x.numpy().tolist(), "label": y.tolist()})
    d = items.describe(ds, 3)
    assert d["key"] == "3" and d["label"] == int(y[3]) and d["image"].shape == (8, 8)
    np.testing.assert_array_equal(items.labels(ds), y.numpy())


def test_request_examples_decode_against_plain_tuples():
    """The service decodes request examples against a training item: a plain tuple may
    hold a numpy input and an int label instead of tensors."""
    task = ClassificationTask()
    template = (np.linspace(0, 1, 64, dtype=np.float32), 3)
    x, y = task.decode_example({"input": [0.5] * 64, "label": 7}, template)
    assert x.dtype == torch.float32 and x.shape == (64,) and y.item() == 7
    batch = task.collate([(x, y), (x, y)])
    assert task.per_sample_loss(torch.nn.Linear(64, 10), batch).shape == (2,)
    with pytest.raises(BadRequestError, match="shape"):
        task.decode_example({"input": [0.5] * 63, "label": 7}, template)


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        (3, 3),
        (True, True),
        (np.int64(7), 7),
        (torch.tensor(4), 4),  # int64
        (np.array([2], dtype=np.uint8), 2),
        ("cat", "cat"),
        (-1.2988660335540771, None),  # a regression target
        (2.0, None),  # whole, but a float: still a target
        (np.float32(1.0), None),
        (torch.tensor(0.5), None),
        (torch.tensor([1, 2]), None),  # not a scalar
        (None, None),
    ],
)
def test_class_labels_are_integers_and_strings_never_floats(value, expect):
    got = items.class_label(value)
    assert got == expect and type(got) is type(expect)
