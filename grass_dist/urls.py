"""The credentials a URL may carry before an '@' (`s3://user:password@bucket/prefix`), and
the URL as logs and errors show it, without them.

An S3 secret may hold '/' or '+', which ends the URL's netloc for `urllib.parse`: read so,
`s3://AKID:abc/def@bucket/idx` has the netloc `AKID:abc` and the secret's tail in its path.
So the user and password are found here as they are written: the user up to the first
':' (no '/' or '@' in it), the password up to the '@'. A path that holds an '@' but no ':'
before it (`s3://bucket/runs/a@b`) carries none.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][\w+.\-]*://)(?P<info>[^@/:]*(?::[^@]*)?)@")


def userinfo(url: str) -> str | None:
    """The `user:password` (or `user`) that `url` carries before an '@', or None."""
    found = _USERINFO.match(url.strip())
    return found["info"] if found and found["info"] else None


def without_userinfo(url: str, mark: str = "") -> str:
    """`url` with its user:password@ left out (or replaced by `mark` + '@')."""
    info = userinfo(url)
    if info is None:
        return url
    scheme, rest = url.strip().split("://", 1)
    return f"{scheme}://{mark + '@' if mark else ''}{rest[len(info) + 1 :]}"


def url_credentials(url: str) -> list[str]:
    """The credentials a URL carries before its '@' (user:password, and each part), which
    an error of the library that parsed it may quote (e.g. as part of a bucket name)."""
    info = userinfo(url)
    if info is None:
        return []
    return [part for part in {info, *info.split(":", 1)} if part]


def redact_url(url: str) -> str:
    """Return ``url`` without user:password in the netloc and without a query string."""
    url = without_userinfo(url, "***")  # before urlsplit: a secret may hold '/'
    parts = urlsplit(url)
    if not parts.query:  # nothing secret-looking (or a plain path)
        return url
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "***", ""))
