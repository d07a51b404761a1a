"""Named exceptions of grass_dist: each message says what went wrong and how to fix it."""

from __future__ import annotations


class GrassError(Exception):
    """Base class of every error grass_dist raises on purpose."""


class StoreUnavailableError(GrassError):
    """The index store cannot be reached, read or written (args: redacted url, reason)."""

    def __init__(self, url: str, reason: str) -> None:
        # args stay (url, reason) so the error pickles through Ray unchanged.
        super().__init__(url, reason)
        self.url, self.reason = url, reason

    def __str__(self) -> str:
        return (
            f"index store {self.url!r} is unavailable: {self.reason}. "
            "Fix: check store.url / store.storage_options (endpoint, bucket, credentials, "
            "permissions) and that the store is reachable from this machine."
        )


class IndexNotFoundError(GrassError):
    """No gradient index exists at the given URL."""


class CorruptIndexError(GrassError):
    """An index file (index.json, a manifest or a shard) is unreadable or fails its checks."""


class CorruptShardError(CorruptIndexError):
    """A committed shard file is missing, truncated or does not match its recorded sha256."""


class CommitConflictError(GrassError):
    """A manifest commit kept losing create-only races and gave up."""


class FingerprintMismatchError(GrassError):
    """The index was built with a different model / compressor / data fingerprint."""


class ConfigError(GrassError, ValueError):
    """A configuration value is missing or invalid; the message names the field and the fix."""


class ModelMismatchError(GrassError):
    """A worker's model replica differs from the driver's."""


class NonFiniteGradientError(GrassError):
    """A compressed gradient contains NaN or inf."""


class ShardFailedError(GrassError):
    """A shard kept failing because its workers died."""


class PreconditionerNotFoundError(GrassError):
    """The index holds no preconditioner of the requested name."""


class ResultsNotFoundError(GrassError):
    """No complete result set of the requested name exists."""


class BadRequestError(GrassError, ValueError):
    """A query request is malformed or too large; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, status)
        self.message, self.status = message, status

    def __str__(self) -> str:
        return self.message


class ServiceError(GrassError):
    """The query service answered with an error (`status` is its HTTP status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status, self.message = status, message

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.message}"
