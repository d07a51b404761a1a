"""A self-contained HTML report of the strongest proponents and opponents of each query.

Examples are drawn through `grass_dist.data.items.describe`: a dataset's own
`describe(i)` when it has one, else what its items show (label, a picture or text), so
plain `TensorDataset`s, lists of tuples or dicts and `datasets.Dataset`s all render.
Images become inline SVG, so the file has no scripts, no external assets and no network
URLs. Labels are compared (label agreement, same-label and wrong-prediction borders) only
where they are class labels (`items.class_label`: integers and strings); float labels are
regression targets, printed to 4 significant digits and never compared.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from html import escape
from typing import Any

import numpy as np
import pandas as pd

from grass_dist.data import items

TOPK_COLUMNS = ("query_row", "query_key", "rank", "kind", "train_row", "train_key", "score")
PER_KIND = 5  # proponents / opponents shown per query
N_SELF_INFLUENCE = 8
TEXT_CHARS = 300
IMAGE_PX = 64
IMAGE_CELLS = 32  # larger images are block-averaged down: a thumbnail needs no more

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 0 0 12px; } h2 { font-size: 17px; margin: 24px 0 8px; }
table.stats td, table.stats th { padding: 2px 12px 2px 0; text-align: left; }
.query { display: flex; gap: 16px; align-items: flex-start; border-top: 1px solid #ccc;
  padding: 12px 0; }
.strip { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; margin: 2px 0; }
.strip-name { width: 90px; font-size: 12px; font-weight: 600; padding-top: 4px; }
.proponent .strip-name { color: #1a7f37; } .opponent .strip-name { color: #b42318; }
.card { width: 104px; border: 2px solid #e4e4e4; border-radius: 4px; padding: 4px;
  font-size: 11px; overflow-wrap: anywhere; }
.card svg { display: block; margin: 0 auto 3px; border: 1px solid #eee; }
.card.query-card { border-color: #888; } .card.wrong { border-color: #d92d20; background: #fff4f3; }
.card.same-label { border-color: #8fd19e; }
.key { color: #666; } .score { font-family: monospace; } .pred-wrong { color: #d92d20; }
.card.text-card { width: 220px; }
.text { font-family: monospace; white-space: pre-wrap; max-height: 120px; overflow: hidden;
  margin-bottom: 3px; }
.legend { font-size: 12px; color: #555; }
"""


def _shrink(img: np.ndarray) -> np.ndarray:
    """(H, W[, 3]) -> at most IMAGE_CELLS per side, by averaging f x f blocks."""
    f = -(-max(img.shape[:2]) // IMAGE_CELLS)
    if f == 1:
        return img
    h, w = img.shape[0] // f, img.shape[1] // f
    blocks = img[: h * f, : w * f].reshape(h, f, w, f, *img.shape[2:])
    return blocks.mean(axis=(1, 3))


def _svg(image: Any) -> str:
    """(H, W) ink in [0, 1] (white = 0, black = 1) or (H, W, 3) RGB in [0, 1] -> inline SVG
    about IMAGE_PX wide."""
    img = np.nan_to_num(np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0))
    if img.ndim != 2 and img.shape[2:] != (3,):
        raise ValueError(f"describe()['image'] must be (H, W) or (H, W, 3), got shape {img.shape}")
    img = _shrink(img)
    # Grey ink becomes RGB; white cells are skipped (the base rect is white).
    rgb = np.repeat(1.0 - img[..., None], 3, axis=2) if img.ndim == 2 else img
    rgb = np.round(255 * rgb).astype(int)
    h, w = rgb.shape[:2]
    rects = [
        f'<rect x="{x}" y="{y}" width="1" height="1" fill="#{r:02x}{g:02x}{b:02x}"/>'
        for y, x in zip(*np.nonzero((rgb < 255).any(axis=2)), strict=True)
        for r, g, b in [rgb[y, x]]
    ]
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{IMAGE_PX}" '
        f'height="{round(IMAGE_PX * h / w)}" viewBox="0 0 {w} {h}" shape-rendering="crispEdges">'
        f'<rect width="{w}" height="{h}" fill="#fff"/>{"".join(rects)}</svg>'
    )


def _content(desc: dict) -> str:
    """The image as SVG, or the escaped text cut to TEXT_CHARS characters."""
    if desc.get("image") is not None:
        return _svg(desc["image"])
    text = str(desc.get("text", ""))
    if len(text) > TEXT_CHARS:
        text = text[:TEXT_CHARS] + "…"
    return f'<div class="text">{escape(text)}</div>'


def _card(desc: dict, key: str, lines: list[str], classes: str = "") -> str:
    """One example: content, then label / extra lines (already HTML) and its key."""
    body = "".join(f"<div>{line}</div>" for line in lines)
    if desc.get("image") is None:
        classes += " text-card"  # text needs a wider card than a thumbnail
    return (
        f'<div class="card {classes}">{_content(desc)}{body}'
        f'<div class="key">{escape(str(key))}</div></div>'
    )


def label_text(value: Any) -> str:
    """A label or prediction as the page prints it: a float (a regression target) to 4
    significant digits, anything else as it is."""
    plain = items.scalar(value)
    if isinstance(plain, float):
        return f"{plain:.4g}"
    return str(value if plain is None else plain)


def _label_line(desc: dict) -> str:
    return "" if desc.get("label") is None else f"label <b>{escape(label_text(desc['label']))}</b>"


def _check_topk(topk: pd.DataFrame) -> None:
    missing = [c for c in TOPK_COLUMNS if c not in topk.columns]
    if missing:
        raise ValueError(f"topk is missing columns {missing}; expected {list(TOPK_COLUMNS)}")


def _top_pairs(topk: pd.DataFrame, train_set: Any, query_set: Any) -> dict[int, bool]:
    """Query row -> whether its rank-0 proponent has its label, for the queries whose label
    and whose rank-0 proponent's label are both class labels (`items.class_label`)."""
    _check_topk(topk)
    top = topk[(topk["kind"] == "proponent") & (topk["rank"] == 0)].drop_duplicates("query_row")
    out = {}
    for q, t in zip(top["query_row"].tolist(), top["train_row"].tolist(), strict=True):
        want = items.class_label(items.label_of(query_set, q))
        got = None if want is None else items.class_label(items.label_of(train_set, t))
        if got is not None:
            out[int(q)] = got == want
    return out


def top_proponent_label_agreement(
    topk: pd.DataFrame, train_set: Any, query_set: Any, rows: list[int] | None = None
) -> float | None:
    """Share of queries whose rank-0 proponent has the query's class label.

    Counted over the queries whose label and whose rank-0 proponent's label are class labels
    (`items.class_label`: integers or strings, never floats); None when there are none,
    e.g. a regression model's float targets or a language model's unlabelled text.

    Args:
        topk: the top-k table (see TOPK_COLUMNS); one rank-0 proponent per query.
        train_set, query_set: map-style datasets (labels read by `items.label_of`).
        rows: restrict to these query rows; None = every query in `topk`.
    """
    pairs = _top_pairs(topk, train_set, query_set)
    keep = None if rows is None else {int(q) for q in rows}
    agree = [same for q, same in pairs.items() if keep is None or q in keep]
    return float(np.mean(agree)) if agree else None


@dataclass(frozen=True)
class LabelStats:
    """What the report's summary and the job's JSON summary say about labels.

    Shares are None where no query qualifies (labels that are not class labels, no
    predictions); each `n_*` is the number of queries its share is taken over.
    """

    agreement: float | None  # rank-0 proponent has the query's class label, all queries
    n_agreement: int
    agreement_correct: float | None  # the same over the queries the model predicts right
    n_agreement_correct: int
    accuracy: float | None  # prediction == class label, over the queries with both
    n_accuracy: int


def label_stats(
    topk: pd.DataFrame, train_set: Any, query_set: Any, predictions: dict[int, Any] | None
) -> LabelStats:
    """Label agreement over all queries of `topk` and over those the model predicts
    correctly, and the model's accuracy on them; see `top_proponent_label_agreement`."""
    pairs = _top_pairs(topk, train_set, query_set)
    queries = set(topk["query_row"].tolist())
    classes = {
        q: (items.class_label(items.label_of(query_set, q)), items.class_label(pred))
        for q, pred in (predictions or {}).items()
        if q in queries
    }
    judged = {q: want == got for q, (want, got) in classes.items() if None not in (want, got)}
    right = [q for q, ok in judged.items() if ok]
    on_right = [pairs[q] for q in right if q in pairs]
    return LabelStats(
        agreement=float(np.mean(list(pairs.values()))) if pairs else None,
        n_agreement=len(pairs),
        agreement_correct=float(np.mean(on_right)) if on_right else None,
        n_agreement_correct=len(on_right),
        accuracy=len(right) / len(judged) if judged else None,
        n_accuracy=len(judged),
    )


def _agreement_legend(labels: LabelStats) -> str:
    """The definition of the summary's label agreement, as README states it."""
    correct = labels.agreement_correct is not None
    over = " and over those the model predicts correctly" if correct else ""
    fields = "report.top_proponent_label_agreement" + (
        " and report.top_proponent_label_agreement_correct" if correct else ""
    )
    return (
        "Label agreement: the share of queries whose top proponent (rank 0) has the query's "
        f"label, over all scored queries{over} (the JSON summary's {fields}). Only class "
        "labels are compared, integers and strings; float labels are regression targets and "
        "get no agreement."
    )


def _summary(
    topk: pd.DataFrame,
    train_set: Any,
    query_set: Any,
    shown: list[int],
    stage_times: dict[str, float] | None,
    predictions: dict[int, Any] | None,
) -> str:
    queries = topk["query_row"].nunique()
    labels = label_stats(topk, train_set, query_set, predictions)
    stats = [
        ("queries scored", f"{queries} (showing {len(shown)})"),
        ("training rows", str(len(train_set))),
    ]
    if labels.agreement is not None:  # class labels only: never floats, nor unlabelled text
        text = f"{labels.agreement:.1%} of {labels.n_agreement} queries"
        if labels.agreement_correct is not None:
            text += (
                f"; {labels.agreement_correct:.1%} of the {labels.n_agreement_correct} "
                "the model predicts correctly"
            )
        stats.append(("top proponent has the query's label", text))
    if labels.accuracy is not None:
        stats.append(("model accuracy on these queries", f"{labels.accuracy:.1%}"))
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in stats)
    html = f'<h2>Summary</h2><table class="stats">{rows}</table>'
    if labels.agreement is not None:
        html += f'<p class="legend">{escape(_agreement_legend(labels))}</p>'
    if stage_times:
        rows = "".join(
            f"<tr><th>{escape(str(k))}</th><td>{float(v):.2f} s</td></tr>"
            for k, v in stage_times.items()
        )
        total = sum(float(v) for v in stage_times.values())
        html += (
            f'<h2>Stage times</h2><table class="stats">{rows}'
            f"<tr><th>sum of the stages</th><td>{total:.2f} s</td></tr></table>"
        )
    return html


def _self_influence(self_influence: pd.DataFrame, train_set: Any) -> str:
    top = self_influence.nlargest(N_SELF_INFLUENCE, "self_influence")
    cards = []
    for r, key, v in zip(top["train_row"], top["train_key"], top["self_influence"], strict=True):
        desc = items.describe(train_set, r)
        value = f'self-infl. <span class="score">{float(v):.3g}</span>'
        cards.append(_card(desc, key, [_label_line(desc), value]))
    return (
        f"<h2>Highest self-influence ({len(cards)})</h2>"
        '<p class="legend">Training examples the model fits least like the rest of the data: '
        "often mislabeled or atypical.</p>"
        f'<div class="strip">{"".join(cards)}</div>'
    )


def _query(
    group: pd.DataFrame, train_set: Any, query_set: Any, predictions: dict[int, Any] | None
) -> str:
    q = int(group["query_row"].iloc[0])
    qdesc = items.describe(query_set, q)
    label = items.class_label(qdesc.get("label"))  # None: no label, or a float target
    lines, classes = [_label_line(qdesc)], "query-card"
    if predictions is not None and q in predictions:
        pred = predictions[q]
        got = items.class_label(pred)
        wrong = label is not None and got is not None and got != label
        span = '<span class="pred-wrong">' if wrong else "<span>"
        lines.append(f"{span}predicted <b>{escape(label_text(pred))}</b></span>")
        classes += " wrong" if wrong else ""
    strips = []
    for kind, name in (("proponent", "Proponents"), ("opponent", "Opponents")):
        rows = group[group["kind"] == kind].sort_values("rank").head(PER_KIND)
        cards = []
        for t, key, score in zip(rows["train_row"], rows["train_key"], rows["score"], strict=True):
            desc = items.describe(train_set, t)
            same = label is not None and items.class_label(desc.get("label")) == label
            score_line = f'score <span class="score">{float(score):.3g}</span>'
            cards.append(
                _card(desc, key, [_label_line(desc), score_line], "same-label" if same else "")
            )
        strips.append(
            f'<div class="strip {kind}"><div class="strip-name">{name}</div>'
            f"{''.join(cards) or '<i>none</i>'}</div>"
        )
    query_card = _card(qdesc, group["query_key"].iloc[0], lines, classes)
    return f'<div class="query">{query_card}<div>{"".join(strips)}</div></div>'


def write_report(
    path: str | os.PathLike | None,
    topk: pd.DataFrame,
    train_set: Any,
    query_set: Any,
    *,
    self_influence: pd.DataFrame | None = None,
    max_queries: int = 12,
    title: str = "grass_dist attribution report",
    stage_times: dict[str, float] | None = None,
    predictions: dict[int, Any] | None = None,
) -> str:
    """Render the attribution report as one self-contained HTML page.

    Args:
        path: where to write it (UTF-8); None only returns the HTML.
        topk: one row per (query, kind, rank), columns TOPK_COLUMNS; proponents are the
            highest scores, opponents the most negative.
        train_set, query_set: map-style datasets; see `grass_dist.data.items.describe`.
        self_influence: columns train_row, train_key, self_influence; the top 8 are shown.
        max_queries: the first this many query rows (ascending) get a section.
        title: page title.
        stage_times: stage name -> seconds, shown as a table.
        predictions: query row -> predicted label; mistakes are highlighted where the
            prediction and the query's label are class labels (`items.class_label`).

    Returns:
        The HTML text.
    """
    _check_topk(topk)
    shown = sorted(topk["query_row"].unique().tolist())[: max(0, max_queries)]
    parts = [_summary(topk, train_set, query_set, shown, stage_times, predictions)]
    if self_influence is not None and not self_influence.empty:
        parts.append(_self_influence(self_influence, train_set))
    # Borders compare class labels only: a regression target never equals another.
    labelled = any(items.class_label(items.label_of(query_set, q)) is not None for q in shown)
    colours = (
        " Green borders mark training examples with the query's label; red marks a query the "
        "model gets wrong."
    )
    parts.append(
        "<h2>Queries</h2>"
        '<p class="legend">Proponents most reduced each query\'s loss, opponents most raised '
        f"it.{colours if labelled else ''}</p>"
    )
    groups = topk[topk["query_row"].isin(shown)].groupby("query_row", sort=True)
    parts.extend(_query(g, train_set, query_set, predictions) for _, g in groups)
    if not shown:
        parts.append("<p><i>No queries in the top-k table.</i></p>")
    html = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{escape(title)}</h1>{''.join(parts)}</body></html>\n"
    )
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(html)
    return html
