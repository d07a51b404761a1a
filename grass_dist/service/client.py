"""Python client of the query service (standard library HTTP, no extra dependency).

    from grass_dist import Client
    client = Client("http://127.0.0.1:8000")
    client.query([{"input": image, "label": 3}], topk=5)[0]["proponents"]

Arrays (numpy or torch) are sent as exact base64 tensors; lists and numbers as they are. A
dataset item `(input, label)` is sent as {"input", "label"}, the classification format.
"""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from grass_dist.errors import ServiceError, ServiceUnreachableError


def encode(value: Any) -> Any:
    """Arrays -> {"b64", "dtype", "shape"} (exact, little-endian), recursively in dicts."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value).reshape(value.shape)  # keeps 0-d labels 0-d
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        return {
            "b64": base64.b64encode(data).decode(),
            "dtype": arr.dtype.name,
            "shape": list(arr.shape),
        }
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


class Client:
    """Talks to `python -m jobs.serve` at `url` (scheme, host, port and route prefix)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def query(
        self, examples: list[dict[str, Any]], topk: int | None = None, kind: str | None = None
    ) -> list[dict[str, Any]]:
        """Top-k proponents/opponents per example: [{"proponents": [...], "opponents": [...]}]
        with entries {"train_row", "train_key", "score"}, best first."""
        items = [
            {"input": e[0], "label": e[1]} if isinstance(e, tuple | list) and len(e) == 2 else e
            for e in examples
        ]
        body: dict[str, Any] = {"examples": [encode(e) for e in items]}
        if topk is not None:
            body["topk"] = topk
        if kind is not None:
            body["kind"] = kind
        return self._call("POST", "/query", json.dumps(body).encode())["results"]

    def health(self) -> dict[str, Any]:
        """{"status": "ok", "train_rows", "layers", "cached", "kinds", "default_kind"}."""
        return self._call("GET", "/healthz")

    def _call(self, method: str, route: str, data: bytes | None = None) -> dict[str, Any]:
        req = urllib.request.Request(
            self.url + route, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            with contextlib.suppress(ValueError, AttributeError):  # not a JSON error body
                detail = json.loads(detail).get("error", detail)
            raise ServiceError(e.code, detail) from None
        except urllib.error.URLError as e:  # no HTTP answer at all
            raise ServiceUnreachableError(
                f"no answer from {self.url} ({e.reason}): is `python -m jobs.serve` running "
                f"there (serve.host, serve.port, serve.route_prefix)?"
            ) from None
