"""An index's fingerprint: what its shards were computed with (model, compression, data,
task), compared with a job's before it reads or writes a shard, and the refusal, with every
differing setting named, when they differ."""

from __future__ import annotations

import json
from typing import Any

from grass_dist.errors import FingerprintMismatchError
from grass_dist.index.manifest import ManifestLog
from grass_dist.index.store import Store

# The `_target_` of an object given to the Python API in memory (grass_dist.assembly), as
# job configs and index fingerprints record it.
IN_MEMORY = "grass_dist.assembly.in_memory"
_MISSING = object()
# Entries an index written before they were part of the fingerprint does not hold: such an
# index is compared without them (what they would say of it cannot be known).
_ADDED_SINCE = frozenset({"model.settings_sha256"})


def canonical(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """JSON round trip: tuples become lists, keys strings, so stored == requested compares."""
    try:
        return json.loads(json.dumps(fingerprint, sort_keys=True))
    except TypeError as exc:
        raise TypeError(f"fingerprint must be JSON-serialisable: {exc}") from exc


def show(value: Any, limit: int = 60) -> str:
    """`value` as JSON for a message, cut to `limit` characters."""
    text = "<missing>" if value is _MISSING else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(items: Any) -> list[str] | None:
    """The "name"s of a list of named entries (the fingerprint's layers), else None."""
    if not isinstance(items, list) or not all(isinstance(x, dict) and "name" in x for x in items):
        return None
    names = [str(x["name"]) for x in items]
    return names if len(set(names)) == len(names) else None


def fingerprint_diff(stored: Any, requested: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Differing leaves as (key path like ``layers['fc1'].k``, stored, requested). Lists of
    named entries are compared name by name, so an added, left-out or reordered layer is
    named rather than shown as two long lists."""
    if isinstance(stored, dict) and isinstance(requested, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in sorted(set(stored) | set(requested)):
            sub = f"{path}.{key}" if path else str(key)
            out += fingerprint_diff(stored.get(key, _MISSING), requested.get(key, _MISSING), sub)
        return out
    ours, theirs = _names(stored), _names(requested)
    if ours is not None and theirs is not None and (ours or theirs):
        was, now = dict(zip(ours, stored, strict=True)), dict(zip(theirs, requested, strict=True))
        common = [n for n in ours if n in now]
        out = []
        if common != [n for n in theirs if n in was]:
            out.append((f"{path} (order)", common, [n for n in theirs if n in was]))
        for name in ours + [n for n in theirs if n not in was]:
            sub = f"{path}[{name!r}]"
            out += fingerprint_diff(was.get(name, _MISSING), now.get(name, _MISSING), sub)
        return out
    if isinstance(stored, list) and isinstance(requested, list) and len(stored) == len(requested):
        return [
            d
            for i, (a, b) in enumerate(zip(stored, requested, strict=True))
            for d in fingerprint_diff(a, b, f"{path}[{i}]")
        ]
    same = (
        stored is not _MISSING
        and requested is not _MISSING
        and (json.dumps(stored, sort_keys=True) == json.dumps(requested, sort_keys=True))
    )
    return [] if same else [(path or "<fingerprint>", stored, requested)]


def _no_commit_yet(store: Store) -> str:
    """What an index without a committed shard means: a job stopped before its first
    commit, whose index may go, or one that started and writes it now, whose may not."""
    from grass_dist.runtime.progress import read_progress  # it imports this package

    url = store.url_of("")
    newest = read_progress(store)  # one killed outright says it runs for good: its time shows
    if newest is not None and newest.get("state") in ("starting", "running"):
        return (
            f"It holds no committed shard yet, and job {newest.get('job_id')} is writing it (its "
            f"progress record says it runs, updated {newest.get('updated')}): do not delete it "
            f"while that job runs; wait for it, or use another store.url."
        )
    return (
        f"It holds no committed shard: a job stopped before its first commit, or one that "
        f"started moments ago is writing it (its progress record comes seconds after: "
        f"`python -m grass_dist.runtime.progress {url}`). Once no job writes it, nothing is "
        f"lost by deleting it: remove {url} and rerun."
    )


# The fix when one entry alone differs: what that difference means.
_ALONE = {
    "model.state_sha256": (
        "the model's weights differ from those the index was built with, its settings "
        "alike: another checkpoint or other model arguments (use a new store.url for "
        "them), or a model factory that builds other weights on every call (random "
        "initial weights, or training inside it), whose index no later run can match: "
        "make model._target_ load saved weights, then use a new store.url."
    ),
    "model.settings_sha256": (
        "the model's weights are those the index was built with, but its settings "
        "differ: a submodule, or a plain attribute of one that its forward may read (a "
        "temperature, an activation's name, a size), so it computes other gradients. Use "
        "a new store.url for this model, or build it as the index was built."
    ),
}


def check_fingerprint(store: Store, stored: dict[str, Any], requested: dict[str, Any]) -> None:
    """FingerprintMismatchError naming every differing setting, unless `requested` is what
    the index at `store` was built with, and the fix: an index without a commit may go."""
    diffs = [
        (path, a, b)
        for path, a, b in fingerprint_diff(stored, requested)
        if not (path in _ADDED_SINCE and a is _MISSING)
    ]
    if not diffs:
        return
    lines = "\n".join(f"  {path}: stored={show(a)} requested={show(b)}" for path, a, b in diffs)
    empty = ""
    if ManifestLog(store).snapshot()[0] == 0:
        empty = f"\n{_no_commit_yet(store)}"
    fix = (
        "use a new store.url (or index.url) for these settings, or rerun with the same "
        "model/compression/data settings as the existing index."
    )
    alone = [path for path, _, _ in diffs]
    if len(alone) == 1 and alone[0] in _ALONE:
        fix = _ALONE[alone[0]]
    elif IN_MEMORY in json.dumps(stored) and IN_MEMORY not in json.dumps(requested):
        fix = (
            "this index was built from Python objects (the Python API's Index.build given a "
            "model or dataset in memory), which no config can name: score it with Index.attribute, "
            "from any process once Index.build with the same objects reopened it, or build "
            "the index from factories (README: Python API) to score it with the jobs."
        )
    raise FingerprintMismatchError(
        f"the gradient index at {store.url_of('')} was built with a different fingerprint:\n"
        f"{lines}\nFix: {fix}{empty}"
    )
