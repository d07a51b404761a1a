"""The HTTP protocol of the query service: request parsing and validation.

POST <prefix>/query with a JSON body

    {"examples": [<example>, ...], "topk": 10, "kind": "influence"}

where each example is in the task's input format (ClassificationTask: {"input": tensor,
"label": int}; tensors as nested lists or {"b64", "dtype", "shape"}); `topk` and `kind`
are optional. The answer is

    {"kind": ..., "topk": ..., "train_rows": n,
     "results": [{"proponents": [{"train_row", "train_key", "score"}, ...],
                  "opponents": [...]}, ...]}           one entry per example, best first

GET <prefix>/healthz answers {"status": "ok", "train_rows", "layers", "cached", "kinds",
"default_kind"}.
Errors answer {"error": message} with a 4xx status: 400 malformed, 404 unknown route,
405 wrong method, 409 kind unavailable, 413 too large, 422 examples that do not fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from grass_dist.config import ServeConfig
from grass_dist.errors import BadRequestError
from grass_dist.scoring.score import KINDS

FIELDS = ("examples", "topk", "kind")


@dataclass
class QueryRequest:
    examples: list[Any]
    topk: int
    kind: str


def parse_query(body: bytes, limits: ServeConfig, default_kind: str) -> QueryRequest:
    """A request body -> QueryRequest; BadRequestError with the HTTP status otherwise."""
    if len(body) > limits.max_request_bytes:
        raise BadRequestError(
            f"request body has {len(body)} bytes, over serve.max_request_bytes="
            f"{limits.max_request_bytes}: send fewer examples per request",
            413,
        )
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequestError(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequestError("request body nests JSON arrays or objects too deeply") from None
    if not isinstance(doc, dict):
        raise BadRequestError(f"request body must be a JSON object with fields {list(FIELDS)}")
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise BadRequestError(f"unknown field(s) {unknown}; allowed: {list(FIELDS)}")
    examples = doc.get("examples")
    if not isinstance(examples, list) or not examples:
        raise BadRequestError("'examples' must be a non-empty list of examples")
    if len(examples) > limits.max_examples:
        raise BadRequestError(
            f"{len(examples)} examples, over serve.max_examples={limits.max_examples}: "
            f"split the request",
            413,
        )
    topk = doc.get("topk", limits.topk)
    if type(topk) is not int or not 1 <= topk <= limits.max_topk:
        raise BadRequestError(f"'topk' must be an integer in [1, {limits.max_topk}], got {topk!r}")
    kind = doc.get("kind", default_kind)
    if kind not in KINDS:
        raise BadRequestError(f"'kind' must be one of {list(KINDS)}, got {kind!r}")
    return QueryRequest(examples, topk, kind)
