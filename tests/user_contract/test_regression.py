"""A user's regression model (MSE on float targets) through `jobs.attribute`, as README's
"Bring your own model and data" runs it: the summary and the page compare no labels.

Float targets are never class labels (`items.class_label`), so the JSON summary has no
label agreement or accuracy, and the report, as Chromium renders it, shows no agreement
line, no same-label or wrong-prediction borders, and the targets to 4 significant digits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import CHROMIUM, rendered_dom
from tests.user_contract.conftest import run_job

pytestmark = pytest.mark.integration

N_TRAIN, N_QUERY = 120, 10


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (.ci/run installs it)")
def test_a_regression_report_compares_no_float_labels(user_pkg, tmp_path):
    proc = run_job(
        "attribute",
        "model=custom",
        "model._target_=my_pkg.regression.model",
        "data=custom",
        "data.train._target_=my_pkg.regression.train_set",
        "data.query._target_=my_pkg.regression.queries",
        "task=custom",
        "task._target_=my_pkg.regression.MSE",
        "store.url=outputs/index-regression",
        "compression.k=16",
        "index.shard_size=64",
        "cluster.num_workers=1",
        user=user_pkg,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[("\n" + proc.stdout).rindex("\n{\n") :])
    assert summary["index"]["rows"] == N_TRAIN and summary["score"]["queries"] == N_QUERY
    assert summary["report"]["top_proponent_label_agreement"] is None
    assert summary["report"]["top_proponent_label_agreement_correct"] is None
    assert summary["report"]["query_accuracy"] is None  # the task has no `predict`

    dom = rendered_dom(Path(summary["report"]["report"]), tmp_path / "profile")
    body = dom.partition("<body>")[2]
    assert "query's label" not in body and "query&#x27;s label" not in body
    assert "agreement" not in body and "model accuracy" not in body
    assert "Green borders" not in body and "same-label" not in body and "wrong" not in body
    cards = re.findall(r'<div class="card query-card[^"]*">(.*?)</div></div>', body)
    assert len(cards) == N_QUERY
    shown = re.findall(r"label <b>([^<]*)</b>", body)
    assert len(shown) >= N_QUERY * 11  # each query card and its 10 training cards
    for value in shown:  # a float, to 4 significant digits: -1.299, not -1.2988660335540771
        assert re.fullmatch(r"-?\d+(\.\d+)?(e[+-]\d+)?", value), value
        digits = value.lstrip("-").partition("e")[0].replace(".", "").lstrip("0")
        assert len(digits) <= 4, value
    assert any("." in value for value in shown)  # the targets are not whole numbers
