"""The HTML attribution report over the digits datasets."""

from __future__ import annotations

import re
import struct
import subprocess
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

from grass_dist.data import digits
from grass_dist.report import (
    TOPK_COLUMNS,
    label_stats,
    label_text,
    top_proponent_label_agreement,
    write_report,
)
from tests.helpers import CHROMIUM, chromium_args, rendered_dom

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
    assert "showing 3" in html and "sum of the stages</th><td>1.75 s" in html
    assert "query&#x27;s label</th>" in html and "Green borders" in html
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

    class Unlabelled(Texts):  # a language model's documents and prompts
        def __getitem__(self, i: int) -> dict:
            ids = torch.tensor([256, 100 + i])
            return {"input_ids": ids, "labels": ids}

        def describe(self, i: int) -> dict:
            return {"key": f"t{i}", "text": f"document {i}"}

    html = write_report(None, make_topk(1), Unlabelled(), Unlabelled())
    body = html.partition("<body>")[2]  # past the stylesheet
    assert "label" not in body and "Green borders" not in body and "document 0" in body


def test_empty_topk_renders(sets):
    html = write_report(None, make_topk(0), *sets)
    assert "No queries" in html and "query&#x27;s label" not in html


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
    assert top_proponent_label_agreement(topk, train, query, rows=[17]) is None
    # Over every query, and over the ones the model predicts correctly (0, 1, 2; 3 wrong):
    # the page states both numbers, with the JSON fields that hold them.
    predictions = {q: int(query.labels[q]) + (q == 3) for q in range(4)}
    stats = label_stats(topk, train, query, predictions)
    assert (stats.agreement, stats.n_agreement) == (0.5, 4)
    assert (stats.agreement_correct, stats.n_agreement_correct) == (2 / 3, 3)
    assert (stats.accuracy, stats.n_accuracy) == (0.75, 4)
    html = write_report(None, topk, train, query, predictions=predictions)
    assert "query&#x27;s label</th><td>50.0% of 4 queries; 66.7% of the 3 the model " in html
    assert "report.top_proponent_label_agreement_correct" in html
    assert "model accuracy on these queries</th><td>75.0%" in html


class Targets:
    """A regression set: a digit picture per row and a float target (`describe` or not)."""

    def __init__(self, targets, describe: bool):
        self.targets = targets
        self.x = torch.rand(len(targets), 64, generator=torch.Generator().manual_seed(0))
        if describe:
            self.describe = lambda i: {"label": self.targets[i], "image": self.x[i].reshape(8, 8)}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], torch.tensor(self.targets[i], dtype=torch.float32)


@pytest.mark.parametrize("describe", [False, True], ids=["items", "describe"])
@pytest.mark.parametrize("whole", [False, True], ids=["continuous", "whole_floats"])
def test_float_targets_get_no_agreement_nor_marks(describe, whole):
    """MSE targets are never compared: not even equal ones, nor whole floats (2.0)."""
    values = [float(v) for v in range(-3, 3)] if whole else [-1.2988660335540771, 0.1, 2.5]
    targets = [values[i % len(values)] for i in range(200)]
    train, query = Targets(targets, describe), Targets(targets, describe)
    topk = make_topk(3)
    top = (topk["kind"] == "proponent") & (topk["rank"] == 0)
    topk.loc[top, "train_row"] = topk.loc[top, "query_row"]  # the same target: still no
    assert top_proponent_label_agreement(topk, train, query) is None
    predictions = {q: targets[q] for q in range(3)}  # a perfect regression, never "right"
    stats = label_stats(topk, train, query, predictions)
    assert stats.agreement is stats.agreement_correct is stats.accuracy is None
    html = write_report(None, topk, train, query, predictions={0: 0.123456789})
    body = html.partition("<body>")[2]  # past the stylesheet
    assert "query&#x27;s label" not in body and "agreement" not in body
    assert "Green borders" not in body and "model accuracy" not in body
    assert "same-label" not in body and "wrong" not in body
    labels = re.findall(r"label <b>([^<]*)</b>", body)
    assert labels and all(re.fullmatch(r"-?\d+(\.\d+)?", v) for v in labels)
    assert all(len(v.lstrip("-").replace(".", "").lstrip("0")) <= 4 for v in labels)
    if not whole:
        assert "label <b>-1.299</b>" in body and "-1.29886" not in body
    assert "predicted <b>0.1235</b>" in body


def test_label_text():
    assert label_text(-1.2988660335540771) == "-1.299"
    assert label_text(np.float32(1234567.0)) == "1.235e+06"
    assert label_text(torch.tensor(0.5)) == "0.5" and label_text(2.0) == "2"
    assert label_text(7) == "7" and label_text(torch.tensor(3)) == "3"
    assert label_text("cat") == "cat" and label_text(np.int64(4)) == "4"


def test_plain_datasets_render(sets):
    """TensorDataset / list-of-dict sets: pictures, labels and row-number keys, no describe."""
    train, query = sets
    plain_train = TensorDataset(
        torch.stack([train[i][0] for i in range(len(train))]), torch.as_tensor(train.labels)
    )
    plain_query = [{"image": query[i][0].reshape(8, 8), "label": query[i][1]} for i in range(20)]
    topk = make_topk(2)
    topk["train_key"] = topk["train_row"].astype(str)  # what the index stores for plain data
    html = write_report(None, topk, plain_train, plain_query, predictions={0: 99})
    assert html.count("<svg") == 2 * 11
    assert f"label <b>{int(query.labels[1])}</b>" in html
    assert f"label <b>{int(train.labels[10])}</b>" in html
    assert '<div class="key">10</div>' in html and '<div class="key">101</div>' in html
    assert html.count('class="card query-card wrong"') == 1
    assert "model accuracy on these queries</th><td>0.0%" in html
    want = topk["query_row"].map(query.labels.__getitem__)
    got = topk["train_row"].map(train.labels.__getitem__)
    top = (topk["kind"] == "proponent") & (topk["rank"] == 0)
    expect = float((want[top] == got[top]).mean())
    assert top_proponent_label_agreement(topk, plain_train, plain_query) == expect


def test_large_and_colour_images_are_thumbnails():
    class Photos:
        def __len__(self) -> int:
            return 200

        def __getitem__(self, i: int):
            rng = np.random.default_rng(i)
            return {"img": rng.integers(0, 255, (96, 64, 3), dtype=np.uint8), "label": "cat"}

    html = write_report(None, make_topk(1), Photos(), Photos())
    svg = re.search(r"<svg[^>]*>", html).group(0)
    assert 'viewBox="0 0 21 32"' in svg  # 96 x 64 averaged in 3 x 3 blocks
    assert "label <b>cat</b>" in html
    assert re.search(r'fill="#(?!([0-9a-f]{2})\1\1)[0-9a-f]{6}"', html)  # not grey: colour


def _png_pixels(data: bytes) -> np.ndarray:
    """An 8-bit RGB(A) PNG -> (H, W, C) uint8; enough of the format to read a screenshot."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, -1)
    out = np.zeros((height, width * bpp), np.int64)
    prev = np.zeros(width * bpp, np.int64)
    for y in range(height):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        if f == 0:
            row = line
        elif f == 1:  # Sub: a running sum per channel
            row = line.reshape(width, bpp).cumsum(axis=0).reshape(-1) % 256
        elif f == 2:  # Up
            row = (line + prev) % 256
        else:  # Average / Paeth depend on the pixel just decoded: byte by byte
            row, up = line.tolist(), prev.tolist()
            for i in range(len(row)):
                a = row[i - bpp] if i >= bpp else 0
                b, c = up[i], up[i - bpp] if i >= bpp else 0
                if f == 3:
                    row[i] = (row[i] + (a + b) // 2) % 256
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                    row[i] = (row[i] + pred) % 256
            row = np.asarray(row, np.int64)
        out[y] = prev = row
    return out.reshape(height, width, bpp).astype(np.uint8)


def test_png_reader_round_trip():
    """The reader against a PNG written here with every filter type (so it can fail)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    rows, prev = [], np.zeros(12, np.int64)
    for y in range(5):
        cur, left = img[y].reshape(-1).astype(np.int64), np.zeros(12, np.int64)
        left[3:] = cur[:-3]
        upleft = np.zeros(12, np.int64)
        upleft[3:] = prev[:-3]
        f = y % 5
        if f == 4:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        else:
            pred = [np.zeros(12, np.int64), left, prev, (left + prev) // 2][f]
        rows.append(bytes([f]) + ((cur - pred) % 256).astype(np.uint8).tobytes())
        prev = cur

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + b"\0\0\0\0"

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 5, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )
    np.testing.assert_array_equal(_png_pixels(png), img)


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (.ci/run installs it)")
def test_report_renders_in_chromium(sets, tmp_path):
    """The default digits report in headless Chromium: query cards with pictures and scores
    in the rendered DOM, and a screenshot that is not blank."""
    train, query = sets
    html_path, png = tmp_path / "report.html", tmp_path / "report.png"
    write_report(html_path, make_topk(3, evil_row=2), train, query, predictions={0: 99})
    base = chromium_args(tmp_path / "profile")
    dom = rendered_dom(html_path, tmp_path / "profile")
    cards = re.findall(r'<div class="card query-card[^"]*">(.*?)</div></div>', dom)
    assert len(cards) == 3 and all("<svg" in c and "<rect" in c for c in cards)
    assert len(re.findall(r'score <span class="score">-?[0-9.e-]+</span>', dom)) == 3 * 10
    assert "<script" not in dom  # the escaped evil key stayed text
    subprocess.run([*base, f"--screenshot={png}", html_path.as_uri()], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    pixels = _png_pixels(png.read_bytes())[..., :3]
    assert pixels.shape == (700, 900, 3)
    ink = (pixels < 128).all(axis=2)  # dark pixels: text and digit strokes
    assert ink.mean() > 0.005, f"screenshot is (nearly) blank: {ink.mean():.2%} dark pixels"
