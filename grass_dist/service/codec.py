"""Tensors in JSON: nested lists, or base64 of the raw bytes with dtype and shape.

The client side is grass_dist.service.client.encode.

`{"b64": "<base64 of C-order little-endian bytes>", "dtype": "float32", "shape": [64]}` is
exact and compact for images; nested lists are convenient for small inputs. Decoding is
always against a template (a training example's tensor), so shape and dtype are checked
before anything reaches the model.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import torch

from grass_dist.errors import BadRequestError

_B64_FIELDS = {"b64", "dtype", "shape"}


def _bad(where: str, message: str) -> BadRequestError:
    return BadRequestError(f"{where}: {message}", status=422)


def _from_b64(value: dict, like: torch.Tensor, where: str) -> np.ndarray:
    if set(value) != _B64_FIELDS:
        raise _bad(where, f"a base64 tensor has exactly the fields {sorted(_B64_FIELDS)}")
    want = str(like.dtype).removeprefix("torch.")
    try:
        dtype = np.dtype(str(value["dtype"])).newbyteorder("<")
    except TypeError:
        dtype = None
    # Any numbers a nested list could hold: integers, or floats where `like` is a float.
    kinds = "iuf" if like.dtype.is_floating_point else "iu"
    if dtype is None or dtype.kind not in kinds:
        raise _bad(where, f"dtype {value['dtype']!r:.40}, expected {want!r}")
    try:
        raw = base64.b64decode(value["b64"], validate=True)
    except (TypeError, binascii.Error) as e:
        raise _bad(where, f"b64 is not valid base64 ({e})") from None
    if dtype.kind in "iu" and not like.dtype.is_floating_point and raw:
        values = np.frombuffer(raw[: len(raw) - len(raw) % dtype.itemsize], dtype=dtype)
        info = np.iinfo(np.dtype(want))
        if values.size and (values.min() < info.min or values.max() > info.max):
            raise _bad(where, f"values beyond {want}'s range")
    shape = value["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad(where, f"shape must be a list of integers, got {shape!r:.80}")
    if shape != list(like.shape):  # before any arithmetic on it: a shape may be any size
        raise _bad(where, f"shape {shape!s:.80}, expected {list(like.shape)}")
    if len(raw) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise _bad(where, f"{len(raw)} bytes do not hold a {dtype.name} tensor of shape {shape}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _from_list(value: Any, like: torch.Tensor, where: str) -> np.ndarray:
    try:
        arr = np.array(value)
    except ValueError as e:  # ragged nesting
        raise _bad(where, f"nested lists are ragged ({e})") from None
    if arr.dtype == object and any(type(v) is int for v in arr.ravel()):
        raise _bad(where, "an integer is out of the 64-bit range")
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise _bad(where, "expected numbers (nested lists) or a base64 tensor")
    if arr.dtype.kind == "b":
        raise _bad(where, "booleans are not numbers here")
    if arr.dtype.kind == "f" and not like.dtype.is_floating_point:
        # A JSON client may write a whole number as 3.0: that is the integer 3.
        whole = np.isfinite(arr) & (arr == np.round(arr))
        if not whole.all():
            first = arr[~whole].ravel()[0].item()
            raise _bad(
                where, f"got {first!r}, not a whole number: expected integers ({like.dtype})"
            )
        return arr.astype(np.int64)
    return arr


def decode_array(value: Any, like: torch.Tensor, where: str) -> torch.Tensor:
    """JSON value -> tensor with `like`'s dtype and shape; BadRequestError (422) otherwise."""
    arr = (
        _from_b64(value, like, where) if isinstance(value, dict) else _from_list(value, like, where)
    )
    if tuple(arr.shape) != tuple(like.shape):
        raise _bad(where, f"shape {list(arr.shape)}, expected {list(like.shape)}")
    out = torch.from_numpy(np.array(arr, dtype=np.dtype(str(like.dtype).removeprefix("torch."))))
    if out.is_floating_point() and not torch.isfinite(out).all():
        raise _bad(where, "contains NaN or infinity")
    return out


def decode_tokens(value: Any, where: str) -> torch.Tensor:
    """A JSON list of token ids (or a 1-D integer base64 tensor) of any length -> a 1-D
    int64 tensor; BadRequestError (422) otherwise."""
    if isinstance(value, list):
        length = len(value)
    elif isinstance(value, dict) and isinstance(value.get("shape"), list):
        length = value["shape"][0] if len(value["shape"]) == 1 else -1
    else:
        raise _bad(where, "expected a list of token ids")
    if not isinstance(length, int) or length < 0:
        raise _bad(where, f"shape {value.get('shape')!s:.80}, expected one dimension")
    return decode_array(value, torch.zeros(length, dtype=torch.long), where)


def decodable(template: Any) -> bool:
    """Whether `decode_like` can shape examples like the training item `template`."""
    if isinstance(template, dict):
        return bool(_fields(template))
    return isinstance(template, (tuple, list)) and len(template) == 2


def _fields(item: dict) -> dict[str, torch.Tensor]:
    """A dict item's numeric fields (tensors, arrays, numbers) as tensors, by name."""
    numeric = (torch.Tensor, np.ndarray, np.number, int, float)
    return {
        k: torch.as_tensor(v)
        for k, v in item.items()
        if isinstance(v, numeric) and not isinstance(v, bool)
    }


def decode_like(example: Any, template: Any) -> Any:
    """A request example -> a dataset item shaped like the training item `template`: dict
    items take their own numeric fields by name, (input, label) pairs take {"input": ...,
    "label": ...}; each value as `decode_array` reads it. BadRequestError (naming the field)
    on anything else. A task serves through it unless it has its own `decode_example`."""
    if isinstance(template, dict):
        fields = _fields(template)
    else:
        # Plain (input, label) items may hold numpy inputs or int labels, not tensors.
        fields = {"input": torch.as_tensor(template[0]), "label": torch.as_tensor(template[1])}
    if not isinstance(example, dict):
        raise BadRequestError(f"an example is an object with fields {sorted(fields)}")
    if set(example) != set(fields):
        raise BadRequestError(
            f"an example has the fields {sorted(example)}; expected {sorted(fields)}"
        )
    out = {k: decode_array(example[k], like, k) for k, like in fields.items()}
    return out if isinstance(template, dict) else (out["input"], out["label"])
