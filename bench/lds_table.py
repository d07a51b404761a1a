"""Render bench/results/lds.md from lds.json (bench_lds.py) and lds_dattri.json (dattri).

Standard library only: both benchmark environments call `write_table()`.
"""

from __future__ import annotations

import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lds")


def _load(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _lds(held: dict) -> str:
    low, high = held["ci95"]
    return f"{held['lds']:.3f} [{low:.3f}, {high:.3f}]"


def _best(curve: list[float], grid: list[float]) -> str:
    i = max(range(len(curve)), key=lambda j: curve[j])
    return f"{curve[i]:.3f} (δ={grid[i]:g})"


def _rows(report: dict, dattri: dict | None) -> list[str]:
    exact = report["exact"]
    ceiling = exact["selection"]["heldout"]["lds"]
    grid = exact["selection"]["grid"]
    lines = [
        "| method | k | dims per layer (fc1, fc2, out) | δ chosen on validation | "
        "held-out LDS [95% CI] | LDS − exact | oracle δ on held-out | proxy's δ → held-out LDS "
        "| index s | precondition s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| exact (all {exact['params']} parameters, Woodbury) | – | – | "
        f"{exact['selection']['chosen']:g} | {_lds(exact['selection']['heldout'])} | 0 | "
        f"{_best(exact['heldout_curve'], grid)} | – | – | {exact['seconds']['total']} (total) |",
    ]
    for row in report["rows"]:
        held = row["selection"]["heldout"]
        dims = ", ".join(row["layers"].values())
        secs = row["seconds"]
        lines.append(
            f"| {row['method']} | {row['k']} | {dims} | {row['selection']['chosen']:g} | "
            f"{_lds(held)} | {held['lds'] - ceiling:+.3f} | {_best(row['heldout_curve'], grid)} | "
            f"{row['proxy_chosen']:g} → {row['proxy_heldout_lds']:.3f} | "
            f"{secs.get('index', 0):.1f} | {secs.get('precondition', 0):.1f} |"
        )
    if dattri is not None and "heldout" in dattri:
        held = dattri["heldout"]
        lines.append(
            f"| dattri {dattri['version']} FactGraSSAttributor | {dattri['k']} | "
            f"{dattri['dims']} | {dattri['chosen']:g} | {_lds(held)} | "
            f"{held['lds'] - ceiling:+.3f} | {_best(dattri['heldout_curve'], dattri['grid'])} "
            f"| – | {dattri['seconds']['cache']:.1f} (cache) | – |"
        )
    return lines


def _curves(report: dict, dattri: dict | None) -> list[str]:
    grid = report["exact"]["selection"]["grid"]
    lines = [
        "| method | k | " + " | ".join(f"{d:g}" for d in grid) + " |",
        "|---|---|" + "---|" * len(grid),
        "| exact | – | " + " | ".join(f"{v:.3f}" for v in report["exact"]["heldout_curve"]) + " |",
    ]
    for row in report["rows"]:
        vals = " | ".join(f"{v:.3f}" for v in row["heldout_curve"])
        lines.append(f"| {row['method']} | {row['k']} | {vals} |")
    if dattri is not None and "heldout_curve" in dattri:
        vals = " | ".join(f"{v:.3f}" for v in dattri["heldout_curve"])
        lines.append(f"| dattri FactGraSS | {dattri['k']} | {vals} |")
    return lines


def _targets(report: dict, dattri: dict | None) -> list[str]:
    ceiling = report["exact"]["selection"]["heldout"]["lds"]
    fact = [r for r in report["rows"] if r["method"] == "factgrass" and r["k"] == 4096]
    if not fact:
        return []
    ours = fact[0]["selection"]["heldout"]["lds"]
    diff = ours - ceiling
    lines = [
        f"- FactGraSS k=4096: held-out LDS {ours:.3f} vs exact influence {ceiling:.3f}, "
        f"difference {diff:+.3f} ({'within' if abs(diff) <= 0.02 else 'NOT within'} 0.02).",
    ]
    if dattri is not None and "heldout" in dattri:
        theirs = dattri["heldout"]["lds"]
        verdict = "no worse than" if ours >= theirs else "WORSE than"
        lines.append(
            f"- dattri FactGraSS k={dattri['k']}: held-out LDS {theirs:.3f} at its best damping "
            f"δ={dattri['chosen']:g} (chosen the same way): ours is {verdict} dattri's "
            f"({ours - theirs:+.3f})."
        )
    elif dattri is not None:
        lines.append(f"- dattri comparison not available: {dattri.get('error')}")
    else:
        lines.append("- dattri comparison not run (bench/bench_lds_dattri.py).")
    return lines


def _cnn(report: dict) -> list[str]:
    cnn = report.get("cnn")
    if not cnn:
        return []
    layers = ", ".join(f"{n} {s['method']}:{s['k']}" for n, s in cnn["layers"].items())
    sel, res = cnn["selection"], cnn["lds"]
    return [
        "## CNN on digits, end to end (Conv2d through flat GraSS)",
        "",
        f"Overrides: `{' '.join(cnn['overrides'])}` (plus identity for layers with at most k "
        f"entries). Layers (method:dims): {layers}.",
        "",
        f"- damping=auto chose δ={sel['chosen']:g} by {sel['objective']} on "
        f"{sel['validation_queries']} validation queries (validation LDS per δ of the grid: "
        + ", ".join(f"{v:.3f}" for v in sel["values"])
        + ").",
        f"- held-out LDS {_lds(res['heldout_queries'])}; all queries {_lds(res['all_queries'])}.",
        f"- ground truth {cnn['ground_truth']['digest']}: {_built(cnn['ground_truth'])}; the "
        f"LDS of one seed's outputs against another's is "
        f"{cnn['ground_truth'].get('seed_agreement', float('nan')):.3f}; "
        f"stage seconds of the attribution {cnn['stage_seconds']}.",
    ]


def _built(gt: dict) -> str:
    seconds = gt.get("train_seconds", gt.get("seconds"))
    when = "by this run" if gt["built_now"] else "by an earlier run, loaded from the cache here"
    return f"retraining took {seconds} s ({when})"


def write_table(prefix: str = RESULTS) -> str:
    """Render <prefix>.md from <prefix>.json (and <prefix>_dattri.json when present)."""
    report = _load(prefix + ".json")
    if report is None:
        raise SystemExit(f"{prefix}.json is missing: run bench/bench_lds.py first")
    dattri = _load(prefix + "_dattri.json")
    s, gt = report["setting"], report["ground_truth"]
    text = "\n".join(
        [
            f"# LDS on the digits MLP: {s['n_train']} train, {s['n_query']} queries, "
            f"{s['subsets']} subsets x {s['seeds']} seeds",
            "",
            f"Commands: `{report['command']}` (project venv, `.venv/bin/python`)"
            + (
                f" and `{dattri['command']}` (dattri venv, `.venv-dattri/bin/python`)"
                if dattri
                else ""
            ),
            "",
            f"Model: {report['model']}. Ground truth {gt['digest']}: {_built(gt)}. The "
            f"LDS of one seed's outputs against another's is {gt['seed_agreement']:.3f} (the "
            f"noise of the targets). Load average at start: "
            f"{report['load_average_at_start']:.1f} on 2 cores (timings are noisy).",
            "",
            "δ is chosen from the grid on a seeded 10 % validation split of the queries by LDS "
            "(precondition.damping=auto); LDS is reported on the other 90 % with a bootstrap "
            "95 % interval over queries. 'oracle' is the best δ for the held-out queries "
            "themselves (reference only); 'proxy' is the δ the label-agreement proxy (used when "
            "no ground truth exists) picks, with its held-out LDS. Dims per layer are "
            "method:dimension; layers whose gradient has at most k entries are kept whole "
            "(identity: `out` has 650 entries, so it is exact at k = 1024 and 4096). Where "
            "the mask budget k' = 4k exceeds a layer (k = 4096: fc1 has 8320 entries, fc2 "
            "8256), the masks keep the whole layer, so FactGraSS, GraSS, Selective-Mask "
            "FactGraSS (whose fit is skipped) and SJLT-only all become the same SJLT of the "
            "full layer gradient with the same seed: their identical rows are expected. The "
            "exact influence uses the Fisher of all parameters jointly with one damping; the "
            "compressed methods use a per-layer (block-diagonal) Fisher with per-layer "
            "damping, which is why they can score above it.",
            "",
            *_targets(report, dattri),
            "",
            *_rows(report, dattri),
            "",
            "## Held-out LDS at every δ",
            "",
            *_curves(report, dattri),
            "",
            *_cnn(report),
            "",
            f"Total: {report.get('total_seconds', '?')} s.",
            "",
        ]
    )
    with open(prefix + ".md", "w") as f:
        f.write(text)
    return text
