"""Retry policy and store error classes: what is retried, how long, and what the user reads."""

from __future__ import annotations

import errno
import pickle
import socket

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from omegaconf import OmegaConf

from grass_dist.config import JobConfig
from grass_dist.errors import (
    ConfigError,
    StoreAccessDeniedError,
    StoreUnavailableError,
    StoreUnreachableError,
)
from grass_dist.index import retry as retry_mod
from grass_dist.index.retry import RetryPolicy, is_transient
from grass_dist.index.store import Store
from tests.conftest import compose_cfg


def _client_error(status: int, code: str, translated: type[OSError] | None = None) -> Exception:
    cause = ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )
    if translated is None:
        return cause
    exc = translated(errno.EIO, code)
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
        (TimeoutError("slow"), True),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (_client_error(503, "SlowDown", OSError), True),
        (_client_error(500, "InternalError"), True),
        (_client_error(412, "PreconditionFailed", OSError), False),
        (_client_error(403, "AccessDenied", PermissionError), False),
        (FileNotFoundError("gone"), False),
        (ValueError("bad argument"), False),
    ],
)
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_policy_delays_grow_and_are_capped():
    policy = RetryPolicy(retries=6, backoff_s=0.5, backoff_max_s=3.0)
    assert [policy.delay(i) for i in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert policy.max_wait_s() == 12.5 and policy.attempts == 7
    with pytest.raises(ValueError, match="store.retries"):
        RetryPolicy(retries=-1)


def _flaky(failures: list[BaseException]):
    calls = []

    def fn():
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "ok"

    return fn, calls


def test_call_retries_transient_errors_with_bounded_sleeps(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(retry_mod.time, "sleep", sleeps.append)
    policy = RetryPolicy(retries=3, backoff_s=1.0, backoff_max_s=1.5)
    fn, calls = _flaky([ConnectionResetError(), TimeoutError()])
    assert policy.call(fn) == "ok" and len(calls) == 3
    assert 0.5 <= sleeps[0] <= 1.0 and 0.75 <= sleeps[1] <= 1.5  # jittered, capped

    sleeps.clear()
    fn, calls = _flaky([ConnectionResetError()] * 10)
    with pytest.raises(ConnectionResetError):
        policy.call(fn)
    assert len(calls) == 4 and len(sleeps) == 3 and sum(sleeps) <= policy.max_wait_s()

    fn, calls = _flaky([PermissionError("denied")])
    with pytest.raises(PermissionError):
        policy.call(fn)
    assert len(calls) == 1  # an answer, not an outage: never retried


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: connections are refused


def test_dead_endpoint_is_unreachable_with_endpoint_attempts_and_no_secret():
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    options = {"key": "AKIDEXAMPLE", "secret": "s3cr3t-Value", "client_kwargs": {}}
    options["client_kwargs"]["endpoint_url"] = endpoint
    store = Store("s3://bucket/prefix", options, RetryPolicy(2, 0.01, 0.02))
    with pytest.raises(StoreUnreachableError) as info:
        store.read_bytes("index.json")
    text = str(info.value)
    for part in (endpoint, "s3://bucket/prefix", "3 attempt(s)", "rerun the same command"):
        assert part in text
    assert "s3cr3t-Value" not in text and "s3cr3t-Value" not in repr(info.value.args)
    assert pickle.loads(pickle.dumps(info.value)).args == info.value.args  # crosses Ray


class _UnreachableS3:
    protocol = ("s3", "s3a")

    def cat_file(self, path):
        raise EndpointConnectionError(endpoint_url="https://bucket.s3.amazonaws.com/")

    def invalidate_cache(self, path=None):
        """Like every fsspec filesystem's (Store drops s3fs's cached listings before reads)."""


def test_an_s3_store_without_endpoint_is_named_at_the_default_endpoint(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    store = Store("s3://bucket/prefix", {}, RetryPolicy(0))
    store._fs, store._root = _UnreachableS3(), "bucket/prefix"
    with pytest.raises(StoreUnreachableError) as info:
        store.read_bytes("index.json")
    text = str(info.value)
    assert text.startswith(
        "index store 's3://bucket/prefix' at the default AWS S3 endpoint is unreachable: "
    )
    assert "at endpoint the" not in text
    assert "No endpoint is set: for an S3-compatible server, set AWS_ENDPOINT_URL" in text
    assert "rerun the same command" in text  # still a job's advice
    named = StoreUnreachableError("s3://b/p", "refused", "http://127.0.0.1:9")
    assert str(named).startswith("index store 's3://b/p' at endpoint http://127.0.0.1:9 is")
    assert "No endpoint is set" not in str(named)
    assert " at the default AWS S3 endpoint (bucket 'b')" in str(
        StoreAccessDeniedError("s3://b/p", "NoCredentialsError", store.endpoint)
    )


class _DenyingS3:
    protocol = ("s3", "s3a")

    def cat_file(self, path):
        raise _client_error(403, "SignatureDoesNotMatch", PermissionError)

    def invalidate_cache(self, path=None):
        """Like every fsspec filesystem's (Store drops s3fs's cached listings before reads)."""


def test_denied_is_access_error_naming_bucket_and_endpoint_but_local_eacces_is_not(tmp_path):
    store = Store("s3://bucket/prefix", {"endpoint_url": "http://127.0.0.1:9"})
    store._fs, store._root = _DenyingS3(), "bucket/prefix"
    with pytest.raises(StoreAccessDeniedError) as info:
        store.read_bytes("index.json")
    for part in ("access denied", "bucket 'bucket'", "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID"):
        assert part in str(info.value)

    local = Store(str(tmp_path))
    local._fs = type("Denying", (), {"cat_file": _DenyingS3.cat_file})()
    local._root = str(tmp_path)
    with pytest.raises(StoreUnavailableError) as info:
        local.read_bytes("x")
    assert not isinstance(info.value, StoreAccessDeniedError)


def test_s3_options_turn_off_botocore_retries_without_mutating_the_config():
    options = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    store = Store("s3://b/p", options, RetryPolicy(1, 0.1, 0.1))
    assert store._fs_options()["config_kwargs"]["retries"]["total_max_attempts"] == 1
    assert options == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    own = {"config_kwargs": {"retries": {"max_attempts": 7}}}
    assert Store("s3://b/p", own)._fs_options()["config_kwargs"] == own["config_kwargs"]
    assert "config_kwargs" not in Store("/tmp/x")._fs_options()
    clone = pickle.loads(pickle.dumps(store))
    assert clone == store and clone.retry == RetryPolicy(1, 0.1, 0.1)


def test_store_retry_settings_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="store.retries"):
        cfg = compose_cfg(tmp_path, "store.retries=-1")
        JobConfig.from_cfg(OmegaConf.to_container(cfg, resolve=True))
