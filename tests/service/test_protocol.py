"""Request validation of the query service, without a server: every refusal has its 4xx."""

import json

import numpy as np
import pytest
import torch

from grass_dist.config import ServeConfig
from grass_dist.errors import BadRequestError
from grass_dist.service.client import encode
from grass_dist.service.codec import decode_array
from grass_dist.service.protocol import parse_query
from grass_dist.tasks.classifier import ClassificationTask
from grass_dist.tasks.language_model import CausalLMTask

LIKE = torch.zeros(2, 3)
TEMPLATE = (torch.zeros(4), torch.tensor(0))


def status_of(fn, *args) -> int:
    with pytest.raises(BadRequestError) as info:
        fn(*args)
    return info.value.status


def test_tensors_decode_from_nested_lists_and_exact_base64():
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    assert torch.equal(decode_array(encode(x), LIKE, "x"), torch.from_numpy(x))
    assert torch.equal(decode_array(x.tolist(), LIKE, "x"), torch.from_numpy(x))
    assert decode_array(3, torch.tensor(0), "label").item() == 3
    # A TensorDataset's label is a 0-d tensor: it must travel as shape [] to match.
    label = torch.tensor(7)
    assert encode(label)["shape"] == []
    assert decode_array(encode(label), label, "label").item() == 7


def test_base64_takes_the_numbers_a_list_could_hold():
    x = np.arange(6, dtype=np.float64).reshape(2, 3) / 7  # as numpy makes them
    assert torch.equal(decode_array(encode(x), LIKE, "x"), torch.from_numpy(x).float())
    assert decode_array(encode(np.int32(3)), torch.tensor(0), "label").item() == 3
    assert decode_array(encode(torch.tensor(3, dtype=torch.int32)), torch.tensor(0), "l") == 3
    with pytest.raises(BadRequestError, match="dtype 'float32', expected 'int64'"):
        decode_array(encode(np.array(3.0, np.float32)), torch.tensor(0), "label")
    big = encode(np.array([2**40], np.int64))
    with pytest.raises(BadRequestError, match="beyond int32's range"):
        decode_array(big, torch.zeros(1, dtype=torch.int32), "ids")


@pytest.mark.parametrize(
    "value",
    [
        [[1, 2], [3, 4]],  # shape
        [[1, 2, 3], [4, 5]],  # ragged
        [["a", "b", "c"], ["d", "e", "f"]],  # not numbers
        [[True, False, True]] * 2,  # booleans
        [[float("nan"), 0, 0], [0, 0, 0]],  # NaN
        {**encode(np.zeros((2, 3), np.float32)), "dtype": "complex64"},  # dtype
        {**encode(np.zeros((2, 3), np.float32)), "dtype": "no-such-type"},  # dtype
        {**encode(np.zeros((2, 3), np.float32)), "b64": "!!"},  # base64
        {**encode(np.zeros((2, 3), np.float32)), "shape": [3, 3]},  # byte count
        {**encode(np.zeros((2, 3), np.float32)), "extra": 1},  # unknown field
        {**encode(np.zeros((2, 3), np.float32)), "b64": "", "shape": [2**32, 2**32]},  # huge
        {**encode(np.zeros((2, 3), np.float32)), "shape": [2**70]},  # beyond int64
        [[2**70, 0, 0], [0, 0, 0]],  # an integer beyond int64
    ],
)
def test_malformed_tensors_are_422(value):
    assert status_of(decode_array, value, LIKE, "input") == 422


def test_fractional_labels_and_unknown_example_fields_are_refused():
    task = ClassificationTask()
    item = task.decode_example({"input": [0.0, 1, 2, 3], "label": 2}, TEMPLATE)
    assert torch.equal(item[0], torch.tensor([0.0, 1, 2, 3])) and item[1].item() == 2
    assert status_of(task.decode_example, {"input": [0.0] * 4, "label": 1.5}, TEMPLATE) == 422
    whole = task.decode_example({"input": [0.0] * 4, "label": 2.0}, TEMPLATE)  # JSON's 2.0 is 2
    assert whole[1].dtype == item[1].dtype and whole[1].item() == 2
    with pytest.raises(BadRequestError, match=r"label: got 1\.5, not a whole number"):
        task.decode_example({"input": [0.0] * 4, "label": 1.5}, TEMPLATE)
    assert status_of(task.decode_example, {"input": [0.0] * 4}, TEMPLATE) == 400
    extra = {"input": [0.0] * 4, "label": 1, "weight": 2}
    assert status_of(task.decode_example, extra, TEMPLATE) == 400


def test_a_language_models_examples_are_token_ids_of_any_length():
    task, template = CausalLMTask(), {"input_ids": torch.arange(8), "labels": torch.arange(8)}
    item = task.decode_example({"input_ids": [5, 6, 7]}, template)  # labels: the input ids
    assert (
        torch.equal(item["input_ids"], torch.tensor([5, 6, 7]))
        and item["labels"].dtype == torch.long
    )
    assert torch.equal(item["labels"], item["input_ids"])
    prompt = task.decode_example({"input_ids": [5, 6, 7], "labels": [-100, -100, 7]}, template)
    assert prompt["labels"].tolist() == [-100, -100, 7]
    sent = encode({"input_ids": np.arange(12, dtype=np.int32)})  # base64, as the client sends
    assert task.decode_example(sent, template)["input_ids"].tolist() == list(range(12))
    for bad, status in [
        ({"text": "hi"}, 400),
        ({"input_ids": [1, 2], "mask": [1, 1]}, 400),
        ({"input_ids": [1, 2], "labels": [1]}, 422),  # lengths differ
        ({"input_ids": [1]}, 422),  # no target
        ({"input_ids": [1, 2, 3], "labels": [1, -100, -100]}, 422),  # no loss: scores all 0
        ({"input_ids": [1.5, 2]}, 422),
        ({"input_ids": "1 2 3"}, 422),
        ({"input_ids": encode(np.zeros((2, 2), np.int64))}, 422),
    ]:
        assert status_of(task.decode_example, bad, template) == status, bad


def test_a_negative_label_is_refused_not_ignored():
    # cross_entropy's ignore_index (-100) would make the loss and gradient zero.
    task, model = ClassificationTask(), torch.nn.Linear(4, 3)
    for label in (-100, -1):
        with pytest.raises(IndexError, match=f"Target {label} is out of bounds"):
            task.per_sample_loss(model, (torch.zeros(2, 4), torch.tensor([0, label])))


LIMITS = ServeConfig(max_examples=2, max_request_bytes=200, max_topk=50)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (json.dumps({"examples": [{}], "colour": 1}).encode(), 400),
        (json.dumps({"examples": []}).encode(), 400),
        (json.dumps({"examples": [{}], "topk": 0}).encode(), 400),
        (json.dumps({"examples": [{}], "topk": 51}).encode(), 400),
        (json.dumps({"examples": [{}], "topk": True}).encode(), 400),
        (json.dumps({"examples": [{}], "kind": "magic"}).encode(), 400),
        (json.dumps({"examples": [{}, {}, {}]}).encode(), 413),
        (json.dumps({"examples": [{"input": [0.0] * 60}]}).encode(), 413),
    ],
)
def test_bad_bodies_get_their_status(body, status):
    assert status_of(parse_query, body, LIMITS, "influence") == status


def test_nesting_beyond_the_json_parsers_depth_is_400():
    body, roomy = b"[" * 100_000 + b"]" * 100_000, ServeConfig(max_request_bytes=10**6)
    with pytest.raises(BadRequestError, match="nests JSON arrays or objects too deeply") as info:
        parse_query(body, roomy, "influence")
    assert info.value.status == 400


def test_a_good_body_takes_defaults_from_the_config():
    req = parse_query(b'{"examples": [{"a": 1}]}', LIMITS, "cosine")
    assert (req.examples, req.topk, req.kind) == ([{"a": 1}], 10, "cosine")
