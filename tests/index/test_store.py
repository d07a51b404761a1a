"""Store (fsspec wrapper) and Parquet shard files, on a local dir and on memory://."""

from __future__ import annotations

import errno
import os
import pickle
import uuid
import warnings

import numpy as np
import pytest

from grass_dist.errors import (
    ConfigError,
    CorruptShardError,
    CreateOnlyUnsupportedError,
    StorageOverflowError,
    StoreUnavailableError,
)
from grass_dist.index.retry import RetryPolicy, is_unclear_refusal
from grass_dist.index.retry import is_lost_race as _s3_lost_race
from grass_dist.index.shards import read_shard, write_shard
from grass_dist.index.store import Store, redact_url

SECRETS = {"key": "AKIAFAKE", "secret": "s3cr3t-value"}


def test_write_read_exists_list_delete(url):
    store = Store(url)
    assert not store.exists("a/b.bin")
    assert store.list("a") == []
    store.write_bytes("a/b.bin", b"one")
    store.write_bytes("a/b.bin", b"two")  # overwrite
    store.write_bytes("a/c.bin", b"three")
    assert store.read_bytes("a/b.bin") == b"two"
    assert store.list("a") == ["b.bin", "c.bin"]  # no temp files left behind
    store.delete("a/b.bin")
    store.delete("a/b.bin")  # idempotent
    assert not store.exists("a/b.bin")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/b.bin")
    with store.open("a/d.bin", "wb") as f:
        f.write(b"opened")
    with store.open("a/d.bin") as f:
        assert f.read() == b"opened"


def test_create_only_semantics(url):
    store = Store(url)
    assert store.create_only("m/0000000001.json", b"first")
    assert not store.create_only("m/0000000001.json", b"second")
    assert store.read_bytes("m/0000000001.json") == b"first"
    assert store.list("m") == ["0000000001.json"]


def test_a_local_store_that_is_a_file_is_refused_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for url, said in (
        (tmp_path / "notes.txt", r"notes.txt is a file, not a folder"),
        (tmp_path / "notes.txt" / "index", r"index lies inside .*notes.txt, which is a file"),
    ):
        with pytest.raises(ConfigError, match=said):
            Store(str(url)).check_writable()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_local_path_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = Store("rel/idx")
    assert store.url == str(tmp_path / "rel" / "idx")
    store.write_bytes("x", b"1")
    assert (tmp_path / "rel" / "idx" / "x").read_bytes() == b"1"


def test_check_writable_and_pickle(url):
    store = Store(url, storage_options={})
    store.check_writable()
    assert store.list("") == []  # the probes leave nothing, not even a folder
    store.write_bytes("k", b"v")
    clone = pickle.loads(pickle.dumps(store))
    assert clone == store and clone._fs is None  # filesystem rebuilt lazily
    assert clone.read_bytes("k") == b"v"


def test_unwritable_store_raises_without_secrets(tmp_path, monkeypatch):
    # The filesystem's own refusal (past the check that names a file in the path).
    monkeypatch.setattr(Store, "_check_local_folder", lambda self: None)
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    store = Store(str(blocker / "idx"), storage_options=dict(SECRETS))
    with pytest.raises(StoreUnavailableError) as info:
        store.check_writable()
    msg = str(info.value)
    assert str(blocker / "idx") in msg and "store.storage_options" in msg
    for text in (msg, repr(store), repr(info.value)):
        assert "AKIAFAKE" not in text and "s3cr3t-value" not in text
    assert "key" in repr(store)  # option names are fine to show, values are not
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == msg


def test_secret_in_low_level_error_is_scrubbed(tmp_path):
    store = Store(f"memory://grass-test-{uuid.uuid4().hex}", storage_options=dict(SECRETS))

    def boom(*args, **kwargs):
        raise PermissionError("access denied for AKIAFAKE / s3cr3t-value")

    store.fs.cat_file = boom  # instance attribute shadows the method for this test only
    try:
        with pytest.raises(StoreUnavailableError) as info:
            store.read_bytes("x")
    finally:
        del store.fs.cat_file
    assert "AKIAFAKE" not in str(info.value) and "s3cr3t-value" not in str(info.value)
    assert "access denied" in str(info.value)


def test_credentials_in_the_url_are_scrubbed_from_the_libraries_errors():
    # s3fs reads "KEY:SECRET@bucket" as the bucket's name, and botocore quotes it back.
    store = Store(
        "s3://AKIAFAKE:url-s3cr3t@grass-dist/p",
        storage_options={"endpoint_url": "http://127.0.0.1:9"},
        retry=RetryPolicy(1, 0.0, 0.0),
    )
    with pytest.raises(StoreUnavailableError) as info:
        store.exists("index.json")
    said = str(info.value)
    assert "Invalid bucket name" in said  # the library's own words, kept
    assert "url-s3cr3t" not in said and "AKIAFAKE" not in said
    assert "***@grass-dist" in said


def test_unknown_protocol_is_unavailable():
    store = Store("nosuchproto://bucket/prefix", storage_options=dict(SECRETS))
    with pytest.raises(StoreUnavailableError) as info:
        store.exists("index.json")
    assert "nosuchproto://bucket/prefix" in str(info.value)
    assert "s3cr3t-value" not in str(info.value)


def test_redact_url():
    assert redact_url("s3://AKIA:secret@bucket/p") == "s3://***@bucket/p"
    assert redact_url("https://host/p?token=abc") == "https://host/p?***"
    assert redact_url("/tmp/x") == "/tmp/x"
    assert Store("s3://AKIA:secret@bucket/p").url_of("a/b") == "s3://***@bucket/p/a/b"


class _ClientError(Exception):
    def __init__(self, status: int, code: str) -> None:
        super().__init__(code)
        self.response = {"ResponseMetadata": {"HTTPStatusCode": status}, "Error": {"Code": code}}


def _translated(errno_: int, status: int, code: str) -> OSError:
    exc = OSError(errno_, code)
    exc.__cause__ = _ClientError(status, code)
    return exc


def test_s3_lost_race_classification():
    assert _s3_lost_race(FileExistsError())
    assert _s3_lost_race(_translated(errno.EINVAL, 412, "PreconditionFailed"))  # SeaweedFS
    assert _s3_lost_race(_translated(errno.EBUSY, 409, "ConditionalRequestConflict"))  # AWS
    assert not _s3_lost_race(_translated(errno.EINVAL, 400, "InvalidArgument"))
    assert not _s3_lost_race(PermissionError(errno.EACCES, "denied"))
    # A bare errno is no proof of a race: only reading the object back can tell.
    assert not _s3_lost_race(OSError(errno.EINVAL, "no cause kept"))
    assert is_unclear_refusal(OSError(errno.EBUSY, "no cause kept"))
    assert not is_unclear_refusal(_translated(errno.EINVAL, 400, "InvalidArgument"))


class _FakeS3:
    """Just enough of s3fs for Store.create_only: objects, and conditional puts that fail with
    ``error`` (after which ``objects`` holds what a racing writer left) or, with
    ``ignore_create``, silently overwrite."""

    protocol = ("s3", "s3a")

    def __init__(self, error: BaseException | None = None, ignore_create: bool = False) -> None:
        self.error, self.ignore_create = error, ignore_create
        self.calls: list[tuple[str, str]] = []
        self.objects: dict[str, bytes] = {}

    def pipe_file(self, path, data, mode="overwrite"):
        self.calls.append((path, mode))
        if self.error is not None:
            raise self.error
        if mode == "create" and path in self.objects and not self.ignore_create:
            raise FileExistsError(path)
        self.objects[path] = data

    def invalidate_cache(self, path=None):
        """No listing cache to drop: every read sees ``objects``."""

    def cat_file(self, path):
        if path not in self.objects:
            raise FileNotFoundError(path)
        return self.objects[path]

    def rm_file(self, path):
        self.objects.pop(path, None)


def _fake_store(fake: _FakeS3, **objects: bytes) -> Store:
    store = Store("s3://bucket/pre")
    store._fs, store._root = fake, "bucket/pre"
    fake.objects.update({f"bucket/pre/{rel}.json": data for rel, data in objects.items()})
    return store


def test_s3_create_only_reads_back_to_decide():
    fake = _FakeS3()
    store = _fake_store(fake)
    assert store.create_only("m.json", b"ours")
    assert fake.calls == [("bucket/pre/m.json", "create")]
    assert not store.create_only("m.json", b"theirs")
    precondition = _translated(errno.EINVAL, 412, "PreconditionFailed")
    assert not _fake_store(_FakeS3(precondition), m=b"theirs").create_only("m.json", b"ours")
    # Our first try landed, its answer was lost, the retry was refused: the bytes are ours.
    assert _fake_store(_FakeS3(precondition), m=b"ours").create_only("m.json", b"ours")
    # A bare EINVAL is a lost race only if another object is there ...
    bare = OSError(errno.EINVAL, "no cause kept")
    assert not _fake_store(_FakeS3(bare), m=b"theirs").create_only("m.json", b"ours")
    with pytest.raises(StoreUnavailableError, match="no cause kept"):  # ... else an error
        _fake_store(_FakeS3(bare)).create_only("m.json", b"ours")
    with pytest.raises(StoreUnavailableError):
        _fake_store(_FakeS3(_translated(errno.EACCES, 403, "AccessDenied"))).create_only(
            "m.json", b"ours"
        )


def test_create_only_that_replaced_an_object_is_refused():
    store = _fake_store(_FakeS3(ignore_create=True))
    store.fs.cat_file = lambda path: b"stale"  # the put "won" but left other bytes
    with pytest.raises(CreateOnlyUnsupportedError, match="right after it was written"):
        store.create_only("m.json", b"ours")
    store = _fake_store(_FakeS3(ignore_create=True), m=b"theirs")
    with pytest.raises(CreateOnlyUnsupportedError) as info:
        store.check_create_only()
    assert "second create-only put replaced" in str(info.value)
    assert "If-None-Match" in str(info.value) and "Fix:" in str(info.value)
    assert not store.fs.objects.keys() - {"bucket/pre/m.json"}  # the probe is removed


def test_create_only_probe_passes_once_per_store(url, monkeypatch):
    store = Store(url)
    store.check_create_only()
    assert store.list("") == []
    monkeypatch.setattr(Store, "create_only", lambda self, rel, data: pytest.fail("probed twice"))
    store.check_create_only()


# ---- shard files -------------------------------------------------------------------------
def _phi(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.fc1": rng.standard_normal((n, 16)).astype(np.float32),
        "model.fc2": rng.standard_normal((n, 4)).astype(np.float32) * 1e-3,
    }


# float16 keeps ~11 significant bits but goes subnormal below 6e-5 (fixed step 2**-24);
# bfloat16 keeps float32's range with 8 bits. float32 must be bit exact.
@pytest.mark.parametrize(
    ("dtype", "rtol", "atol"),
    [("float32", 0.0, 0.0), ("float16", 2**-11, 2**-25), ("bfloat16", 2**-8, 0.0)],
)
def test_shard_round_trip(url, dtype, rtol, atol):
    store = Store(url)
    n = 50
    phi, row_ids, keys = _phi(n), np.arange(100, 100 + n), [f"ex-{i}" for i in range(n)]
    nbytes, sha = write_shard(store, "shards/s0/a.parquet", row_ids, keys, phi, dtype)
    assert nbytes == len(store.read_bytes("shards/s0/a.parquet")) and len(sha) == 64
    data = read_shard(store, "shards/s0/a.parquet", expected_sha256=sha)
    assert data.row_ids.dtype == np.int64 and data.row_ids.tolist() == row_ids.tolist()
    assert data.keys == keys and list(data.phi) == ["model.fc1", "model.fc2"]
    for name, x in phi.items():
        assert data.phi[name].dtype == np.float32 and data.phi[name].shape == x.shape
        np.testing.assert_allclose(data.phi[name], x, rtol=rtol, atol=atol)
    only = read_shard(store, "shards/s0/a.parquet", layers=["model.fc2"])
    assert list(only.phi) == ["model.fc2"] and len(only) == n


def test_bfloat16_rounding_edge_cases(url):
    store = Store(url)
    x = np.array([[1.0, -2.5, np.inf, -np.inf, np.nan, 0.0, 1 + 2**-8, 3.0e38]], np.float32)
    write_shard(store, "s.parquet", np.arange(1), ["k"], {"l": x}, "bfloat16")
    got = read_shard(store, "s.parquet").phi["l"][0]
    assert got[:4].tolist() == [1.0, -2.5, np.inf, -np.inf] and np.isnan(got[4])
    assert got[5] == 0.0 and got[6] == 1.0  # ties round to even
    assert np.isfinite(got[7])


def test_gradients_too_large_for_the_storage_dtype_are_refused_naming_rows_and_fix(url):
    # float16 holds at most 65504: a larger float32 gradient would be stored as inf (with
    # only numpy's RuntimeWarning) and fail the preconditioner of the whole index.
    store = Store(url)
    phi = _phi(6)
    phi["model.fc1"][[1, 4], 3] = [7.0e4, -2.5e5]  # finite in float32
    phi["model.fc1"][2, 0] = 65519.0  # rounds down to 65504: stored
    row_ids, keys = np.arange(100, 106), [f"ex-{i}" for i in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused by name, not by a numpy warning
        with pytest.raises(StorageOverflowError) as refused:
            write_shard(store, "shards/s0/a.parquet", row_ids, keys, phi, "float16")
    said = str(refused.value)
    assert said.startswith("rows [101, 104] (keys ['ex-1', 'ex-4']) have compressed gradients")
    assert "in layers ['model.fc1'] as large as 2.5e+05" in said
    assert "index.dtype=float16 holds at most 65504" in said
    assert said.endswith(
        "Fix: rebuild the index with index.dtype=bfloat16 (or float32) in a new store.url "
        "(an index keeps its dtype)."
    )
    assert not store.exists("shards/s0/a.parquet")
    for dtype in ("bfloat16", "float32"):  # the dtypes the fix names hold them
        write_shard(store, f"{dtype}.parquet", row_ids, keys, phi, dtype)
        assert np.isfinite(read_shard(store, f"{dtype}.parquet").phi["model.fc1"]).all()


def test_empty_shard(url):
    store = Store(url)
    phi = {"l": np.zeros((0, 3), np.float32)}
    _, sha = write_shard(store, "e.parquet", np.zeros(0, np.int64), [], phi, "float16")
    data = read_shard(store, "e.parquet", expected_sha256=sha)
    assert len(data) == 0 and data.phi["l"].shape == (0, 3)


def test_sha_mismatch_and_truncation_name_the_file(url):
    store = Store(url)
    _, sha = write_shard(store, "shards/s1/x.parquet", np.arange(5), list("abcde"), _phi(5))
    with pytest.raises(CorruptShardError, match=r"shards/s1/x\.parquet.*index\.repair=true"):
        read_shard(store, "shards/s1/x.parquet", expected_sha256="0" * 64)
    raw = store.read_bytes("shards/s1/x.parquet")
    store.write_bytes("shards/s1/x.parquet", raw[: len(raw) // 2])
    with pytest.raises(CorruptShardError, match=r"shards/s1/x\.parquet.*sha256"):
        read_shard(store, "shards/s1/x.parquet", expected_sha256=sha)
    with pytest.raises(CorruptShardError, match=r"shards/s1/x\.parquet.*cannot be parsed"):
        read_shard(store, "shards/s1/x.parquet")
    with pytest.raises(CorruptShardError, match=r"shards/s1/gone\.parquet.*missing"):
        read_shard(store, "shards/s1/gone.parquet")


def test_write_shard_validates_shapes(url):
    store = Store(url)
    with pytest.raises(ValueError, match="shape"):
        write_shard(store, "v.parquet", np.arange(3), list("abc"), {"l": np.zeros((2, 4))})
    with pytest.raises(ValueError, match="keys"):
        write_shard(store, "v.parquet", np.arange(3), list("ab"), {"l": np.zeros((3, 4))})
    with pytest.raises(ValueError, match="dtype"):
        write_shard(store, "v.parquet", np.arange(3), list("abc"), {"l": np.zeros((3, 4))}, "int8")
    assert not os.path.exists(os.path.join(store.url, "v.parquet"))


def test_gradient_columns_use_byte_stream_split(url):
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = Store(url)
    write_shard(store, "b.parquet", np.arange(8), list("abcdefgh"), _phi(8), "bfloat16")
    meta = pq.ParquetFile(pa.BufferReader(store.read_bytes("b.parquet"))).metadata
    encodings = {
        meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i).encodings
        for i in range(meta.num_columns)
    }
    assert "BYTE_STREAM_SPLIT" in encodings["model.fc1.list.element"]
    assert "BYTE_STREAM_SPLIT" in encodings["model.fc2.list.element"]
