"""The HTML attribution report over the digits datasets."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from grass_dist.data import digits
from grass_dist.report import TOPK_COLUMNS, top_proponent_label_agreement, write_report

CHROMIUM = Path("/usr/bin/chromium")
EVIL_KEY = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def sets():
    return digits("train", 200, 20), digits("query", 200, 20)


def make_topk(n_queries: int, per_kind: int = 6, evil_row: int | None = None) -> pd.DataFrame:
    """Synthetic top-k: query q's proponents are train rows 10q.., scores 1/(rank+1)."""
    rows = []
    for q in range(n_queries):
        qkey = EVIL_KEY if q == evil_row else f"digits/q{q}"
        for rank in range(per_kind):
            for kind, sign, offset in (("proponent", 1, 0), ("opponent", -1, 100)):
                t = offset + 10 * q + rank
                score = sign * 1.0 / (rank + 1) / 7
                rows.append((q, qkey, rank, kind, t, f"train/{t}", score))
    df = pd.DataFrame(rows, columns=list(TOPK_COLUMNS))
    return df.astype({"query_row": "int64", "train_row": "int64"})


def test_report_structure_and_escaping(sets, tmp_path):
    train, query = sets
    topk = make_topk(4, evil_row=1)
    self_inf = pd.DataFrame(
        {"train_row": np.arange(20), "train_key": [f"si/{i}" for i in range(20)]}
    ).assign(self_influence=np.linspace(0, 1, 20))
    path = tmp_path / "report.html"
    html = write_report(
        path,
        topk,
        train,
        query,
        self_influence=self_inf,
        max_queries=3,
        title="digits <demo>",
        stage_times={"index": 1.5, "score & topk": 0.25},
        predictions={0: 99, 1: int(query.labels[1])},
    )
    assert path.read_text(encoding="utf-8") == html
    # 3 shown queries x (query + 5 proponents + 5 opponents) + 8 self-influence cards.
    assert html.count("<svg") == 3 * 11 + 8
    assert "digits/q0" in html and "digits/q2" in html and "digits/q3" not in html
    assert "0.143" in html and "-0.0714" in html  # 1/7 and -1/14 at 3 significant digits
    assert "train/5" not in html  # rank 5 is beyond the 5 shown per kind
    assert "si/19" in html and "si/11" not in html  # the 8 highest self-influences
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "digits &lt;demo&gt;" in html and "score &amp; topk" in html
    assert "showing 3" in html and "total</th><td>1.75 s" in html
    assert html.count('class="card query-card wrong"') == 1  # predicted 99 for query 0
    assert not re.search(r"(src|href)=|https?://(?!www\.w3\.org/2000/svg)", html)


def test_text_datasets_are_escaped_and_truncated(sets):
    class Texts:
        def __len__(self) -> int:
            return 50

        def describe(self, i: int) -> dict:
            return {"key": f"t{i}", "label": i % 2, "text": "<b>" + "x" * 1000}

    html = write_report(None, make_topk(1), Texts(), Texts())
    assert "<svg" not in html and "&lt;b&gt;" in html and "x" * 301 not in html


def test_empty_topk_renders(sets):
    html = write_report(None, make_topk(0), *sets)
    assert "No queries" in html and "n/a" in html


def test_missing_columns_are_named(sets):
    with pytest.raises(ValueError, match="score"):
        write_report(None, make_topk(1).drop(columns="score"), *sets)


def test_top_proponent_label_agreement(sets):
    train, query = sets
    topk = make_topk(4)
    # Point each query's rank-0 proponent at a train row with the same label for queries
    # 0 and 2, a different label for 1 and 3: the agreement is 1/2, 1 on [0, 2], 0 on [1].
    for q in range(4):
        label = query.labels[q]
        match = label if q % 2 == 0 else (label + 1) % 10
        t = int(np.flatnonzero(train.labels == match)[0])
        sel = (topk["query_row"] == q) & (topk["kind"] == "proponent") & (topk["rank"] == 0)
        topk.loc[sel, "train_row"] = t
    assert top_proponent_label_agreement(topk, train, query) == 0.5
    assert top_proponent_label_agreement(topk, train, query, rows=[0, 2]) == 1.0
    assert top_proponent_label_agreement(topk, train, query, rows=[1]) == 0.0
    assert np.isnan(top_proponent_label_agreement(topk, train, query, rows=[17]))


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_report_renders_in_chromium(sets, tmp_path):
    train, query = sets
    html_path, png = tmp_path / "report.html", tmp_path / "report.png"
    write_report(html_path, make_topk(3, evil_row=2), train, query, predictions={0: 99})
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={png}", "--window-size=1200,1600", html_path.as_uri(),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
