"""Ensembles (TRAK-style): attribute with C models and average their scores.

Member c is the job's model with `model.seed + c` (C independently trained models), or
with the overrides `ensemble.models[c]` (e.g. `{epochs: 10}`: training is deterministic,
so that is the checkpoint after 10 epochs of the same run). Each member has its own
gradient index under the run's index URL, `<index url>/ckpt_<c>/`, and writes dense scores;
the averaged result set lives at `<index url>/results/<run.name>/`, in the same layout as
a single model's (top-k, self-influence, dense), so every reader works on it unchanged.
Averaging streams shard by shard: no stage holds an n_train x n_query matrix.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from grass_dist.config import JobConfig
from grass_dist.errors import ConfigError, ResultsNotFoundError
from grass_dist.gradients.computer import sample_key
from grass_dist.scoring import results
from grass_dist.scoring.tiles import TopK

MEMBER_DIR = "ckpt_{}"


def is_ensemble(cfg: JobConfig) -> bool:
    return cfg.ensemble.size > 1 or bool(cfg.ensemble.models)


def member_configs(raw: dict[str, Any], cfg: JobConfig) -> list[dict[str, Any]]:
    """The resolved config of each member: its model, its own index, dense scores on."""
    e = cfg.ensemble
    if e.models:
        overrides = [dict(o) for o in e.models]
    elif "seed" in cfg.model:
        overrides = [{"seed": int(cfg.model["seed"]) + c} for c in range(e.size)]
    else:
        raise ConfigError(
            f"ensemble.size={e.size} varies model.seed, but model._target_="
            f"{cfg.model['_target_']!r} takes no seed; list the members' model overrides in "
            f"ensemble.models instead"
        )
    root = cfg.index_url.rstrip("/")
    members = []
    for c, override in enumerate(overrides):
        member = copy.deepcopy(raw)
        member["model"] = {**member["model"], **override}
        member.setdefault("index", {})["url"] = f"{root}/{MEMBER_DIR.format(c)}"
        member.setdefault("scoring", {})["dense"] = True
        member["ensemble"] = {"size": 1, "models": []}
        members.append(member)
    return members


def _dense_by_shard(where: Any, name: str) -> dict[str, str]:
    """{shard id: dense part path} of a complete result set."""
    files = results.manifest(where, name)["files"]
    if "dense" not in files:
        raise ResultsNotFoundError(
            f"member results {name!r} have no dense scores; members are scored with "
            f"scoring.dense=true, so rerun the ensemble job"
        )
    # Parts are named <shard id>.<tile start>.parquet: the same in every member.
    return {rel.rsplit("/", 1)[1].removesuffix(".parquet"): rel for rel in files["dense"]}


def _mean_block(members: list[Any], parts: list[dict[str, str]], shard: str, name: str):
    rows, total = None, None
    for where, by_shard in zip(members, parts, strict=True):
        table = results.read_table(where, by_shard[shard], name)
        r = table["train_row"].to_numpy()
        q = table.schema.field("scores").type.list_size
        s = table["scores"].combine_chunks().flatten().to_numpy().reshape(-1, q)
        if rows is not None and not np.array_equal(rows, r):
            raise ResultsNotFoundError(f"ensemble members disagree on the rows of shard {shard}")
        rows, total = r, s.astype(np.float64) if total is None else total + s
    return rows, (total / len(members)).astype(np.float32)


def _self_influence(members: list[Any], name: str) -> pa.Table | None:
    tables = []
    for where in members:
        if "self_influence" not in results.manifest(where, name)["files"]:
            return None
        tables.append(results.load_table(where, name, "self_influence").sort_by("train_row"))
    mean = np.mean([t["self_influence"].to_numpy() for t in tables], axis=0)
    base = tables[0]
    return pa.table(
        {
            "train_row": base["train_row"],
            "train_key": base["train_key"],
            "self_influence": pa.array(mean, pa.float64()),
        }
    )


def _topk_table(props: TopK, opps: TopK, query_keys: list[str], train_keys: dict[int, str]):
    cols: dict[str, list] = {
        k: [] for k in ("query_row", "query_key", "rank", "kind", "train_row", "score")
    }
    for label, top in (("proponent", props), ("opponent", opps)):
        rows, vals = top.rows.numpy(), top.values.numpy()
        for q in range(rows.shape[0]):
            keep = rows[q] >= 0
            n = int(keep.sum())
            cols["query_row"] += [q] * n
            cols["query_key"] += [query_keys[q]] * n
            cols["rank"] += list(range(n))
            cols["kind"] += [label] * n
            cols["train_row"] += rows[q][keep].tolist()
            cols["score"] += vals[q][keep].tolist()
    cols["train_key"] = [train_keys[r] for r in cols["train_row"]]
    return pa.table(cols)


def average(members: list[Any], name: str, out: Any, topk: int, train: Any) -> dict[str, Any]:
    """Average the members' result sets `name` into `out`'s result set `name`.

    `members` and `out` offer put/get/has_artifact (GradientIndex or results.ArtifactDir); `train`
    is the training set (for the keys of the top-k rows). Dense scores are averaged shard
    by shard; top-k and self-influence follow from the average.
    """
    parts = [_dense_by_shard(m, name) for m in members]
    if any(set(p) != set(parts[0]) for p in parts):
        raise ResultsNotFoundError(
            f"ensemble members' results {name!r} cover different shards; rebuild the members "
            f"with the same index.shard_size"
        )
    member_topk = results.load_table(members[0], name, "topk")
    qrows, qkeys = member_topk["query_row"].to_pylist(), member_topk["query_key"].to_pylist()
    query_keys = dict(zip(qrows, qkeys, strict=True))
    n_query = max(query_keys) + 1
    props, opps = TopK.empty(n_query, topk, True), TopK.empty(n_query, topk, False)
    dense_files = []
    run_dir = results.new_run_dir(name)
    for part in sorted(parts[0]):
        rows, block = _mean_block(members, parts, part, name)
        scores, row_ids = torch.tensor(block), torch.tensor(rows)  # copies: Arrow is read-only
        props.update(scores, row_ids)
        opps.update(scores, row_ids)
        shard, start = part.rsplit(".", 1)
        dense_files.append(results.write_dense_part(out, run_dir, shard, int(start), rows, block.T))
    named = set(props.rows.flatten().tolist()) | set(opps.rows.flatten().tolist())
    train_keys = {r: sample_key(train, r) for r in named if r >= 0}
    keys = [query_keys.get(q, str(q)) for q in range(n_query)]
    files: dict[str, Any] = {
        "topk": results.write_table(
            out, run_dir, "topk.parquet", _topk_table(props, opps, keys, train_keys)
        ),
        "dense": dense_files,
    }
    self_inf = _self_influence(members, name)
    if self_inf is not None:
        files["self_influence"] = results.write_table(
            out, run_dir, "self_influence.parquet", self_inf
        )
    summary = {"ensemble_members": len(members), "queries": n_query}
    results.complete(out, name, files, summary)
    return {**summary, "files": files}
