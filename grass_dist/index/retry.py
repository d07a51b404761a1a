"""What a storage failure means, and retrying store operations with bounded backoff.

Failures are classified once, here: transient (retried), access denied, a lost create-only
race (an answer, see ``is_lost_race``; ``is_unclear_refusal`` when only a read-back can
tell), or another storage error.

An error is transient when it may go away by itself: the endpoint refused or dropped the
connection, timed out, or answered 500/502/503/504 or a throttling code. Denied access, a
missing object or a lost create-only race is an answer, not an outage, and is never retried.

For ``s3://`` stores this is the only retry layer that waits: botocore's own retries are
turned off (see ``Store``), so ``retries`` and the delays below bound the time an operation
can take to fail when the endpoint is down.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Class names (anywhere in the MRO) of connection-level failures: builtin, botocore, aiohttp,
# urllib3 and fsspec spell them differently, and several of those packages are optional.
_TRANSIENT_NAMES = {
    "ConnectionError",  # builtin (refused, reset, aborted) and botocore's base class
    "TimeoutError",
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "HTTPClientError",  # botocore: ConnectionClosedError and friends
    "ClientConnectionError",  # aiohttp
    "ServerTimeoutError",
    "FSTimeoutError",
    "IncompleteRead",
    "FileExpired",  # s3fs: the object changed while read in ranges; read it again
}
_TRANSIENT_STATUS = {500, 502, 503, 504}
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
}
_ANSWERS = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError)
# Exception modules that mean "talking to storage failed" even when not an OSError.
_STORAGE_MODULES = {"botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "fsspec"}
# Codes and botocore exceptions that mean "these credentials may not do this".
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
_DENIED_NAMES = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


def _response(exc: BaseException | None) -> dict | None:
    response = getattr(exc, "response", None)
    return response if isinstance(response, dict) else None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or the error it was translated from) may succeed when retried."""
    if isinstance(exc, _ANSWERS):
        return False
    for err in (exc, exc.__cause__):
        if err is None:
            continue
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(err).__mro__):
            return True
        response = _response(err)
        if response is not None:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = response.get("Error", {}).get("Code")
            return status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES
    return False


def is_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from talking to storage (OSError or a storage client library)."""
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _STORAGE_MODULES


def is_access_denied(exc: BaseException) -> bool:
    """True for a refused request or missing credentials (not for a local EACCES)."""
    if isinstance(exc, PermissionError) or type(exc).__name__ in _DENIED_NAMES:
        return True
    response = getattr(exc.__cause__, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status == 403 or response.get("Error", {}).get("Code") in _DENIED_CODES
    return False


def is_lost_race(exc: BaseException) -> bool:
    """True when a conditional (If-None-Match) put was refused because the object exists.

    s3fs maps the 412 that AWS tags with ``Condition: If-None-Match`` to FileExistsError, but
    SeaweedFS's 412 arrives as OSError(EINVAL) and AWS may answer 409 (concurrent conditional
    write, OSError(EBUSY)), with the botocore ClientError kept as ``__cause__``: only that
    status or code makes such an error a lost race (see ``is_unclear_refusal`` otherwise).
    """
    if isinstance(exc, FileExistsError):
        return True
    response = getattr(exc.__cause__, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = response.get("Error", {}).get("Code")
        return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")
    return False


def is_unclear_refusal(exc: BaseException) -> bool:
    """An EINVAL/EBUSY from a conditional put with no HTTP status kept: maybe a lost race.

    Errno alone cannot tell a 412/409 from a malformed request, so the caller reads the object
    back to decide (``Store.create_only``).
    """
    return (
        isinstance(exc, OSError)
        and exc.errno in (errno.EINVAL, errno.EBUSY)
        and _response(exc.__cause__) is None
    )


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a store operation that failed transiently.

    Attempt ``i`` (0-based) that fails waits ``min(backoff_s * 2**i, backoff_max_s)`` seconds,
    scaled by a random factor in [0.5, 1] so that many workers do not retry in lockstep, and
    then tries again, at most ``retries`` times.
    """

    retries: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ValueError(
                f"store.retries, store.backoff_s and store.backoff_max_s must be >= 0, got "
                f"{self.retries}, {self.backoff_s}, {self.backoff_max_s}"
            )

    @property
    def attempts(self) -> int:
        """Total attempts: the first one plus ``retries``."""
        return self.retries + 1

    def delay(self, attempt: int) -> float:
        """Longest wait (seconds) after failed attempt ``attempt`` (0-based)."""
        return min(self.backoff_s * 2.0**attempt, self.backoff_max_s)

    def max_wait_s(self) -> float:
        """Upper bound on the total time spent waiting between attempts."""
        return sum(self.delay(i) for i in range(self.retries))

    def call(self, fn: Callable[[], T], what: str = "store operation") -> T:
        """``fn()``, retried on transient errors; the last error propagates unchanged."""
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as exc:
                if attempt >= self.retries or not is_transient(exc):
                    raise
                wait = self.delay(attempt) * random.uniform(0.5, 1.0)
                attempt += 1
                log.warning(
                    "%s failed (%s); retry %d of %d in %.2f s",
                    what,
                    type(exc).__name__,
                    attempt,
                    self.retries,
                    wait,
                )
                time.sleep(wait)
