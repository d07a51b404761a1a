"""Plain map-style datasets through every batch stage, as README's `data._target_` row says.

The user's data has no `keys`, no `describe` and no `labels`: a `TensorDataset`, a list of
`(input, label)` tuples and a list of dicts. Each job must index, precondition, score and
write a report (row numbers as keys, labels, digit pictures), and `precondition.damping=auto`
must find the labels inside the items for its proxy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.user_contract.conftest import run_job

pytestmark = pytest.mark.integration

N_TRAIN, N_QUERY = 120, 12

# The built-in digits MLP, small; its own training data is sized explicitly because the
# `data=custom` preset has no n_train / n_query for the model's defaults to follow.
TINY = (
    "model.hidden=[16]",
    "model.epochs=5",
    f"model.n_train={N_TRAIN}",
    f"model.n_query={N_QUERY}",
    "model.data_seed=0",
    "compression.k=16",
    "index.shard_size=64",
    "cluster.num_workers=1",
)


def _data(train: str, query: str) -> tuple[str, ...]:
    return (
        "data=custom",
        f"data.train._target_=my_pkg.data.{train}",
        f"+data.train.n={N_TRAIN}",
        f"data.query._target_=my_pkg.data.{query}",
        f"+data.query.n={N_QUERY}",
    )


def _summary(stdout: str) -> dict:
    """The job's JSON summary, alone on stdout (README: `| jq .index`)."""
    return json.loads(stdout)


def _check_report(path: Path) -> None:
    html = path.read_text(encoding="utf-8")
    queries = re.findall(
        r'<div class="card query-card[^"]*">(.*?)<div class="key">(\d+)</div>', html
    )
    assert len(queries) == N_QUERY
    assert all("<svg" in body and "label <b>" in body for body, _ in queries)
    assert [int(k) for _, k in queries] == list(range(N_QUERY))  # plain data: row numbers
    train_keys = re.findall(
        r'score <span class="score">[^<]+</span></div><div class="key">(\d+)<', html
    )
    assert len(train_keys) == N_QUERY * 10 and all(0 <= int(k) < N_TRAIN for k in train_keys)
    assert html.count("label <b>") >= N_QUERY * 11  # every query and shown proponent / opponent
    assert re.search(r"query&#x27;s label</th><td>\d+\.\d%", html)  # labels found, not n/a


@pytest.mark.parametrize(
    ("train", "query", "extra"),
    [
        ("train_set", "queries", ("precondition.damping=auto",)),
        ("tuples", "query_dicts", ()),
    ],
    ids=["TensorDataset+damping_auto", "tuples+dicts"],
)
def test_plain_datasets_attribute(user_pkg, tmp_path, train, query, extra):
    proc = run_job("attribute", *TINY, *_data(train, query), *extra, user=user_pkg, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(proc.stdout)
    assert summary["index"]["rows"] == N_TRAIN
    _check_report(Path(summary["report"]["report"]))
    assert summary["report"]["query_accuracy"] is not None
    if extra:
        chosen = summary["damping"]
        assert chosen["objective"].startswith("label_agreement@")
        assert chosen["chosen"] in chosen["grid"] and len(chosen["values"]) == len(chosen["grid"])
