"""Atomic puts on a local filesystem: readers only ever see a finished file.

`Store` uses them for local paths: a write replaces its object with a finished temp file
(`os.replace`), and a create-only put links one into place (`create_only`).
"""

from __future__ import annotations

import errno
import os
import uuid


def finished_temp(path: str, data: bytes | memoryview) -> str:
    """`data` written and synced to a new temp file beside `path` (its folder made if absent);
    returns the temp file's path."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    # Dot-prefixed so manifest listings (which match digit names only) ignore it.
    tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def create_only(path: str, data: bytes) -> bool:
    """Write `path` only if it does not exist; True when this call created it.

    A complete temp file is hard-linked into place: link() fails with EEXIST if the name is
    taken, and readers only ever see the finished file.
    """
    tmp = finished_temp(path, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # Filesystem without hard links: exclusive create (a reader may see it mid-write).
        try:
            with open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
    finally:
        os.unlink(tmp)
