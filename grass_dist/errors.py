"""Named exceptions of grass_dist: each message says what went wrong and how to fix it."""

from __future__ import annotations


class GrassError(Exception):
    """Base class of every error grass_dist raises on purpose."""


# What `Store.endpoint` says of an S3 store that names no endpoint (boto's default: AWS).
DEFAULT_S3_ENDPOINT = "the default AWS S3 endpoint"


def at_endpoint(endpoint: str | None) -> str:
    """`` at endpoint http://...``, `` at the default AWS S3 endpoint``, or "" (no endpoint)."""
    if not endpoint:
        return ""
    return f" at {endpoint}" if endpoint == DEFAULT_S3_ENDPOINT else f" at endpoint {endpoint}"


class StoreUnavailableError(GrassError):
    """The index store cannot be reached, read or written (args: redacted url, reason, endpoint).

    `problem()` says what failed and `fix` what a job's user can do; `str()` is both. A
    command other than a job (the progress reader) gives `problem()` its own fix."""

    fix = (
        "Fix: check store.url / store.storage_options (endpoint, bucket, credentials, "
        "permissions) and that the store is reachable from this machine."
    )

    def __init__(self, url: str, reason: str, endpoint: str | None = None) -> None:
        # args stay plain strings so the error pickles through Ray unchanged.
        super().__init__(url, reason, endpoint)
        self.url, self.reason, self.endpoint = url, reason, endpoint

    def where(self) -> str:
        """``index store 's3://b/p' at endpoint http://...`` (no credentials)."""
        return f"index store {self.url!r}{at_endpoint(self.endpoint)}"

    def problem(self) -> str:
        """What failed, without the fix and without a final period."""
        return f"{self.where()} is unavailable: {self.reason}"

    def __str__(self) -> str:
        return f"{self.problem()}. {self.fix}"


class StoreUnreachableError(StoreUnavailableError):
    """The store kept failing transiently (refused, timeouts, 5xx) until retries ran out."""

    fix = (
        "Fix: check that the endpoint is up and reachable from every node of the job (or raise "
        "store.retries / store.backoff_s to ride out longer outages), then rerun the same "
        "command: committed shards are kept and only the missing ones are computed."
    )
    # Added to `fix` when no endpoint is set: an S3-compatible server needs one.
    no_endpoint = (
        "No endpoint is set: for an S3-compatible server, set AWS_ENDPOINT_URL or "
        "+store.storage_options.endpoint_url=http://HOST:PORT."
    )

    def problem(self) -> str:
        return f"{self.where()} is unreachable: {self.reason}"

    def __str__(self) -> str:
        hint = f" {self.no_endpoint}" if self.endpoint == DEFAULT_S3_ENDPOINT else ""
        return f"{self.problem()}. {self.fix}{hint}"


class StoreAccessDeniedError(StoreUnavailableError):
    """The store refused the credentials or their permissions (HTTP 403, bad signature, none)."""

    fix = (
        "Fix: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
        "in the environment of every node; README: S3 credentials through environment "
        "variables) and that they may read, write and list this bucket and prefix."
    )

    def __init__(
        self, url: str, reason: str, endpoint: str | None = None, given: str | None = None
    ) -> None:
        super().__init__(url, reason, endpoint)
        self.args = (url, reason, endpoint, given)
        self.given = given  # where the job's config gave the credentials it used, if it did
        if given is not None:
            self.fix = (
                f"Fix: check the credentials given in {given}, which this job used (they "
                f"belong in the environment of every node: README, S3 credentials through "
                f"environment variables), and that they may read, write and list this "
                f"bucket and prefix."
            )

    def problem(self) -> str:
        bucket = _bucket(self.url)
        named = f" (bucket {bucket!r})" if bucket else ""
        return f"access denied by the {self.where()}{named}: {self.reason}"


def _bucket(url: str) -> str | None:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("s3", "s3a", "gs", "gcs"):
        return None
    return rest.split("/", 1)[0] or None


class IndexNotFoundError(GrassError):
    """No gradient index exists at the given URL."""


class CorruptIndexError(GrassError):
    """An index file (index.json, a manifest or a shard) is unreadable or fails its checks."""


class CorruptShardError(CorruptIndexError):
    """A committed shard file is missing, truncated or does not match its recorded sha256."""


class CorruptPreconditionerError(CorruptIndexError):
    """A stored preconditioner file is truncated, unparsable or does not match the sha256
    its header records."""


class CommitConflictError(GrassError):
    """A manifest commit kept losing create-only races and gave up."""


class CreateOnlyUnsupportedError(GrassError):
    """The store does not enforce create-only puts, so two committers could both win."""


class FingerprintMismatchError(GrassError):
    """The index was built with a different model / compressor / data fingerprint."""


class DataMismatchError(FingerprintMismatchError):
    """data.train no longer holds the rows an existing index was built from."""


class ConfigError(GrassError, ValueError):
    """A configuration value is missing or invalid; the message names the field and the fix."""


class _AtPositions:
    """An error about some entries of a batch, `positions` (the computer names their rows);
    raised in Ray workers, so it pickles with both of its arguments."""

    def __init__(self, message: str, positions: list[int]):
        super().__init__(message)
        self.positions = positions

    def __reduce__(self):
        return (type(self), (str(self), self.positions))


class BadTokensError(_AtPositions, ConfigError):
    """Token ids outside the model's vocabulary; `positions` are the batch entries holding
    them."""


class ModelMismatchError(GrassError):
    """A worker's model replica differs from the driver's."""


class NonFiniteGradientError(GrassError):
    """A compressed gradient contains NaN or inf."""


class StorageOverflowError(NonFiniteGradientError):
    """Some rows' compressed gradients are finite in float32 but not in index.dtype (larger
    than its largest value, 65504 for float16), so storing them would write inf."""


class NonFiniteShardError(CorruptIndexError):
    """A committed shard holds NaN or inf gradients (written before the storage cast was
    checked): no preconditioner can be built from it."""


class BadRowsError(GrassError):
    """The task or model failed on some data rows: their content, not the config."""


class NonFiniteLossError(_AtPositions, NonFiniteGradientError):
    """Some examples' loss is NaN or inf; `positions` are theirs in the batch. (Their
    gradients may still be finite, e.g. zero where the model's output was replaced by NaN.)"""


class ShardFailedError(GrassError):
    """A shard kept failing because its workers died."""


class PreconditionerNotFoundError(GrassError):
    """The index holds no preconditioner of the requested name."""


class ResultsNotFoundError(GrassError):
    """No complete result set of the requested name exists."""


class CorruptResultsError(GrassError):
    """A file of a complete result set (or its `_COMPLETE.json`) is missing, cut short or
    fails its page checksums: the scores must be computed again; the index is not affected."""


class WorkerStartError(GrassError):
    """A worker actor raised while starting (building its model, data or compressors)."""


class ClusterUnreachableError(GrassError):
    """No Ray cluster answers at the configured cluster.address."""


class RayStartError(GrassError):
    """The embedded Ray could not be started."""


class PlacementTimeoutError(GrassError):
    """No worker could be placed on the cluster for too long."""


class ReducerFailedError(GrassError):
    """The reducer kept dying during a stage."""


class MissingDependencyError(GrassError, ImportError):
    """An optional dependency (an extra of grass_dist) is not installed."""


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


class ServiceUnreachableError(ServiceError):
    """No HTTP answer from the query service's URL (nothing listens there, or unreachable)."""

    def __init__(self, message: str) -> None:
        GrassError.__init__(self, message)
        self.status, self.message = 0, message

    def __str__(self) -> str:
        return self.message


class GroundTruthError(GrassError):
    """LDS ground truth is missing, inconsistent with the scores, or could not be built."""


class DampingSelectionError(GrassError):
    """precondition.damping=auto has no objective to choose by (no ground truth, no labels)."""


class DampingNotChosenError(ConfigError):
    """precondition.damping=auto, but no batch job recorded the delta it chose."""


class ServiceCheckError(GrassError):
    """The query service's pre-deploy query failed, so it is not deployed."""


class BadRecordError(ConfigError):
    """A data record lacks a configured field, or its value is null or not a string."""


class ShardCollectedError(GrassError):
    """A commit named a shard file that garbage collection had already removed."""


class ResultsCollectedError(GrassError):
    """A scoring run's files were removed (by gc) before the run was published."""


def listed(values: list, most: int = 10) -> str:
    """The first `most` of `values` for a message, and how many more there are."""
    return (
        f"{values[:most]}"
        if len(values) <= most
        else f"{values[:most]} and {len(values) - most} more"
    )
