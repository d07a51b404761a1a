"""What grass_dist reads from a dataset besides its items: keys, labels and a description.

Any map-style dataset works (`__len__` and `__getitem__`): a `TensorDataset`, a list of
`(input, label)` tuples, a list of dicts, a `datasets.Dataset`. Two attributes are
optional and win when present:

- `keys`: a stable id per row; otherwise the row number is the key.
- `describe(i)`: the report's view of row i, a dict with "key", "label" and "image" or
  "text"; otherwise it is derived from the item (see `describe`).

Every stage reads rows through these functions, so a dataset that trains also indexes,
scores, reports and chooses its damping.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from grass_dist.tasks.classifier import INPUT_FIELDS, LABEL_FIELDS

MIN_IMAGE_SIDE = 4  # smaller "images" are more likely feature vectors than pictures
VECTOR_PREVIEW = 8  # values shown for an input that is neither image nor text


def sample_key(dataset: Any, row: int) -> str:
    """The stable key of a dataset row: `dataset.keys[row]` if it has keys, else the row."""
    keys = getattr(dataset, "keys", None)
    # A dict-like dataset has a keys() method, which is not a list of row keys.
    return str(keys[row]) if keys is not None and not callable(keys) else str(row)


def scalar(value: Any) -> Any | None:
    """A label-like Python scalar (int, float, bool, str) or None for anything else; a
    one-element tensor or array gives the Python type of its dtype's kind (int64 -> int,
    float32 -> float)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (np.ndarray, np.generic)) and value.size == 1:
        return value.item()
    return None


def _label(item: Any) -> Any | None:
    """The scalar label of an `(input, label, ...)` item or of a dict's label field."""
    if isinstance(item, (tuple, list)):
        return scalar(item[1]) if len(item) > 1 else None
    if isinstance(item, dict):
        return next((scalar(item[k]) for k in LABEL_FIELDS if k in item), None)
    return None


def _input(item: Any) -> Any | None:
    """What an item shows: a tuple's first element, a dict's input field, or the item."""
    if isinstance(item, (tuple, list)):
        return item[0] if item else None
    if not isinstance(item, dict):
        return item
    field = next((k for k in INPUT_FIELDS if k in item), None)
    if field is not None:
        return item[field]
    # Unknown field names (e.g. a `datasets.Dataset` with an "img" or "sentence" column):
    # the first field that renders as a picture or as text.
    return next((v for k, v in item.items() if k not in LABEL_FIELDS and _view(v)), None)


def _array(x: Any) -> np.ndarray | None:
    """A numeric numpy view of a tensor, array, PIL image or nested list (None otherwise)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError):
        return None
    return arr if arr.dtype.kind in "biuf" else None


def _channels_last(arr: np.ndarray) -> np.ndarray | None:
    """(C, H, W) or (H, W, C) with C in 1, 3, 4 -> (H, W) or (H, W, 3); None if neither."""
    first, last = arr.shape[0] in (1, 3, 4), arr.shape[-1] in (1, 3, 4)
    if first and not last:
        arr = np.moveaxis(arr, 0, -1)
    elif not last:
        return None
    return arr[..., 0] if arr.shape[-1] == 1 else arr[..., :3]  # alpha is dropped


def image_of(x: Any) -> np.ndarray | None:
    """The input as a picture, or None when it does not look like one.

    Pictures are 2-D arrays (H, W), (1|3|4, H, W), (H, W, 1|3|4), or flat vectors whose
    length is a square (digits' 64 = 8 x 8); float, uint8 or bool only, so token ids are
    never drawn. Returns (H, W) grey, 1 = ink (the digits convention), or (H, W, 3) RGB,
    float64 in [0, 1]: uint8 is divided by 255, floats already in [0, 1] are kept (a faint
    image stays faint) and any other range is min-max scaled.
    """
    arr = _array(x)
    if arr is None or arr.dtype.kind not in "bfu" or (arr.dtype.kind == "u" and arr.itemsize > 1):
        return None
    if arr.ndim == 1:
        side = math.isqrt(arr.size)
        arr = arr.reshape(side, side) if side * side == arr.size else arr
    elif arr.ndim == 3:
        arr = _channels_last(arr)
    if arr is None or arr.ndim not in (2, 3) or min(arr.shape[:2]) < MIN_IMAGE_SIDE:
        return None
    img = np.nan_to_num(arr.astype(np.float64))
    if arr.dtype == np.uint8:
        return img / 255.0
    lo, hi = float(img.min()), float(img.max())
    if lo >= 0.0 and hi <= 1.0:
        return img
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def _view(x: Any) -> dict[str, Any]:
    """{"image": ...} or {"text": ...} for an input; {} when it is neither."""
    if isinstance(x, str):
        return {"text": x}
    image = image_of(x)
    if image is not None:
        return {"image": image}
    arr = _array(x)
    if arr is None or arr.size == 0:
        return {}
    # A feature vector: its shape and first values are still worth a glance.
    head = np.array2string(arr.ravel()[:VECTOR_PREVIEW], precision=3, separator=", ")
    more = ", ..." if arr.size > VECTOR_PREVIEW else ""
    return {"text": f"{tuple(arr.shape)} {head[:-1]}{more}]"}


def label_of(dataset: Any, row: int) -> Any | None:
    """Row `row`'s label (a Python scalar), or None when the row has no scalar label."""
    describe_fn = getattr(dataset, "describe", None)
    if callable(describe_fn):
        label = describe_fn(int(row)).get("label")
        if label is not None:
            return label
    return _label(dataset[int(row)])


def class_label(value: Any) -> int | str | None:
    """`value` as a class label to compare for equality, or None when it is not one.

    Class labels are integers (a Python int or bool, a NumPy integer, a one-element integer
    or bool tensor or array) and strings. Floats are regression targets, whole ones (2.0)
    included: two targets are never compared for equality, so label agreement and the
    report's same-label and wrong-prediction marks skip them.
    """
    value = scalar(value)
    return value if isinstance(value, (int, str)) else None  # bool is an int


def describe(dataset: Any, row: int) -> dict[str, Any]:
    """The report's view of one row: "key", and "label", "image" or "text" when known.

    `dataset.describe(row)` when it exists (a missing key or label is filled in from the
    dataset); otherwise derived from the item: the input of an `(input, label, ...)` tuple
    or list, of a dict's input field (tasks.INPUT_FIELDS, else the first field that is a
    picture or text) or the bare item, drawn as "image" when `image_of` accepts it, as
    "text" when it is a string, else as a short preview of its values; "label" when the
    item's second element or label field (tasks.LABEL_FIELDS) is a scalar.
    """
    row = int(row)
    describe_fn = getattr(dataset, "describe", None)
    if callable(describe_fn):
        desc = dict(describe_fn(row))
        if desc.get("label") is None:
            desc["label"] = _label(dataset[row])
    else:
        item = dataset[row]
        x = _input(item)
        desc = {"label": _label(item), **({} if x is None else _view(x))}
    desc.setdefault("key", sample_key(dataset, row))
    if desc["label"] is None:
        del desc["label"]
    return desc


def _column_labels(dataset: Any) -> list | None:
    """A `datasets.Dataset`'s label column, read without decoding every row's input."""
    columns = getattr(dataset, "column_names", None)
    if not isinstance(columns, list):
        return None
    field = next((k for k in LABEL_FIELDS if k in columns), None)
    return None if field is None else list(dataset[field])


def labels(dataset: Any) -> np.ndarray | None:
    """(N,) labels of every row, or None unless every row has a scalar label.

    `dataset.labels` when it has one entry per row; a `datasets.Dataset`'s label column;
    otherwise `label_of` row by row.
    """
    n = len(dataset)
    given = getattr(dataset, "labels", None)
    if hasattr(given, "__len__") and not callable(given) and len(given) == n:
        return np.asarray(given)
    values = _column_labels(dataset)
    if values is None:
        values = []
        for row in range(n):
            values.append(label_of(dataset, row))
            if values[-1] is None:
                return None  # one unlabelled row is enough to refuse: skip reading the rest
    values = [scalar(v) for v in values]
    return None if any(v is None for v in values) else np.asarray(values)
