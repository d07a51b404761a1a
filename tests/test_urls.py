"""A URL's user:password@ is found as written, also with an S3 secret's '/' and '+'."""

from __future__ import annotations

import pytest

from grass_dist.index.store import redact_url
from grass_dist.urls import userinfo, without_userinfo


@pytest.mark.parametrize(
    ("url", "info", "plain"),
    [
        ("s3://AKID:se/cr+et@bucket/idx", "AKID:se/cr+et", "s3://bucket/idx"),
        ("s3://AKID@bucket/idx", "AKID", "s3://bucket/idx"),
        ("s3://bucket/runs/a@b", None, "s3://bucket/runs/a@b"),  # an '@' in a key
        ("s3://bucket/x:y@z", None, "s3://bucket/x:y@z"),
        ("/data/a@b:c", None, "/data/a@b:c"),
        ("file:///tmp/idx", None, "file:///tmp/idx"),
    ],
)
def test_userinfo_is_found_as_written(url, info, plain):
    assert userinfo(url) == info and without_userinfo(url) == plain
    shown = redact_url(url)
    assert (info is None and shown == url) or shown == plain.replace("://", "://***@", 1)
    # urllib alone: the netloc of the first ends at the secret's '/', and its tail showed.
    assert "cr+et" not in shown
