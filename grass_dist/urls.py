"""The credentials a URL may carry before an '@' (`s3://user:password@bucket/prefix`).

An S3 secret may hold '/' or '+', which ends the URL's netloc for `urllib.parse`: read so,
`s3://AKID:abc/def@bucket/idx` has the netloc `AKID:abc` and the secret's tail in its path.
So the user and password are found here as they are written: the user up to the first
':' (no '/' or '@' in it), the password up to the '@'. A path that holds an '@' but no ':'
before it (`s3://bucket/runs/a@b`) carries none.
"""

from __future__ import annotations

import re

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
