"""grass_dist's errors survive the trip from a Ray worker: pickled and unpickled, each is
the same type with the same message and fields (Ray hands the caller an
UnserializableException, with the message buried in its text, for one that is not)."""

from __future__ import annotations

import inspect
import pickle

import pytest

from grass_dist import errors

# An argument for each constructor parameter name the errors use.
ARGUMENTS = {
    "message": "token id 700 is outside the model's vocabulary of 260",
    "reason": "connection refused",
    "url": "s3://bucket/index",
    "endpoint": "http://127.0.0.1:8333",
    "positions": [1, 3],
    "status": 422,
    "given": "store.storage_options",
}
CLASSES = [
    c
    for c in vars(errors).values()
    if isinstance(c, type) and issubclass(c, errors.GrassError) and c.__module__ == errors.__name__
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_error_pickles_as_itself(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind == p.VAR_POSITIONAL for p in params):  # Exception's own __init__(*args)
        params = [inspect.Parameter("message", inspect.Parameter.POSITIONAL_ONLY)]
    unknown = [p.name for p in params if p.name not in ARGUMENTS]
    assert not unknown, f"give ARGUMENTS a value for {unknown}"
    args = [ARGUMENTS[p.name] for p in params]
    error = cls(*args)
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls
    assert str(back) == str(error) and vars(back) == vars(error)


def test_the_errors_raised_with_batch_positions_are_among_them():
    assert {errors.BadTokensError, errors.NonFiniteLossError} <= set(CLASSES)
