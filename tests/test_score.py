"""Scoring kinds, self-influence, per-layer breakdown and dense parts against float64 references."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from grass_dist.index.shards import table_from_bytes
from grass_dist.runtime.scoring import ScoreOptions, breakdown_records, score_records
from grass_dist.scoring import results
from grass_dist.scoring.fisher_sum import FisherSum
from grass_dist.scoring.precondition import Preconditioner
from grass_dist.scoring.score import prepare_queries, whiteners_for
from grass_dist.scoring.topk import decode
from tests.synthetic import phi_rows, read_all, write_index

LAYERS = {"a": 6, "b": 4}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    index = write_index(str(tmp_path_factory.mktemp("idx")), 300, LAYERS, shard_rows=70)
    rows, train = read_all(index)
    query = phi_rows(10_000, 10_009, LAYERS, seed=1)
    query["a"][3] = 0.0  # a query whose layer-a gradient vanishes
    pre = Preconditioner.from_fisher(FisherSum.of(train))
    return index, rows, train, query, pre


def reference(kind, train, query, pre, damping):
    """Dense (n_train, Q) float64 scores and per-layer terms {layer: (n_train, Q)}."""
    t = {n: torch.tensor(x, dtype=torch.float64) for n, x in train.items()}
    q = {n: torch.tensor(x, dtype=torch.float64) for n, x in query.items()}
    if kind == "influence":
        terms = {}
        for n in t:
            h = t[n].T @ t[n] / t[n].shape[0]
            lam = damping * torch.trace(h) / h.shape[0]
            inv = torch.linalg.inv(h + lam * torch.eye(h.shape[0], dtype=torch.float64))
            terms[n] = t[n] @ inv @ q[n].T
    elif kind == "grad_dot":
        terms = {n: t[n] @ q[n].T for n in t}
    else:
        tn = torch.cat(list(t.values()), 1).norm(dim=1, keepdim=True)
        qn = torch.cat(list(q.values()), 1).norm(dim=1, keepdim=True)
        terms = {n: (t[n] @ q[n].T) / (tn @ qn.T) for n in t}
    return sum(terms.values()), terms


def brute_topk(dense: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """(n, Q) -> (Q, k) train rows, ties to the lower row."""
    s = dense.T if largest else -dense.T
    return torch.argsort(s, dim=1, descending=True, stable=True)[:, :k]


@pytest.mark.parametrize("kind", ["influence", "grad_dot", "cosine"])
def test_every_kind_matches_its_float64_definition(setup, kind, tmp_path):
    index, rows, train, query, pre = setup
    damping = 0.3
    prepared = prepare_queries(query, kind, pre, damping)
    records = sorted(index.committed().values(), key=lambda r: r.start)
    opts = ScoreOptions(topk=7, tile_rows=32)
    whiten = whiteners_for(pre, list(LAYERS), damping)
    partial, parts = score_records(
        index, records, prepared, opts, whiten, "results/x/run", diag_dir="results/x/run"
    )
    expected, _ = reference(kind, train, query, pre, damping)
    dense = torch.tensor(_assemble(index, parts["dense"]), dtype=torch.float64)
    assert (dense - expected).abs().max() / expected.abs().max() < 1e-5
    if kind == "cosine":
        assert dense[:, 3].abs().max() <= 1.0 + 1e-6 and dense[:, 3].abs().max() > 0.1
    for keys, sign in ((partial.proponents, 1), (partial.opponents, -1)):
        values, top_rows = decode(keys, sign)
        assert torch.equal(top_rows, brute_topk(expected, 7, sign > 0))
        np.testing.assert_allclose(
            values, expected.gather(0, top_rows.T).T.float(), rtol=1e-5, atol=1e-6
        )
    t = {n: torch.tensor(x, dtype=torch.float64) for n, x in train.items()}
    self_ref = sum(((t[n] @ torch.linalg.inv(_damped(t[n], damping))) * t[n]).sum(1) for n in t)
    # Self-influence streams to one part per shard, each row with its key.
    assert len(parts["self_influence"]) == len(records)
    diag = pa.concat_tables(
        table_from_bytes(index.get_artifact(p)) for p in parts["self_influence"]
    ).sort_by("train_row")
    assert diag["train_row"].to_pylist() == list(range(300))
    assert diag["train_key"].to_pylist() == [f"row-{r}" for r in range(300)]
    np.testing.assert_allclose(diag["self_influence"].to_numpy(), self_ref.numpy(), rtol=1e-4)
    norm_ref = sum((t[n] ** 2).sum(1) for n in t).numpy()
    np.testing.assert_allclose(diag["grad_norm_sq"].to_numpy(), norm_ref, rtol=1e-6)


def _damped(x: torch.Tensor, damping: float) -> torch.Tensor:
    h = x.T @ x / x.shape[0]
    return h + damping * torch.trace(h) / h.shape[0] * torch.eye(h.shape[0], dtype=h.dtype)


def _assemble(index, parts) -> np.ndarray:
    tables = [table_from_bytes(index.get_artifact(p)) for p in parts]
    table = pa.concat_tables(tables).sort_by("train_row")
    assert table["train_row"].to_pylist() == list(range(300))  # every row exactly once
    q = table.schema.field("scores").type.list_size
    return table["scores"].combine_chunks().flatten().to_numpy().reshape(-1, q)


def test_dense_part_names_are_deterministic_so_a_retry_overwrites(setup):
    index, *_, query, pre = setup
    prepared = prepare_queries(query, "grad_dot")
    records = sorted(index.committed().values(), key=lambda r: r.start)
    opts = ScoreOptions(topk=3, tile_rows=50)
    _, first = score_records(index, records, prepared, opts, dense_dir="results/y/r")
    _, again = score_records(index, records, prepared, opts, dense_dir="results/y/r")
    first, again = first["dense"], again["dense"]
    assert first == again and len(set(first)) == len(first) == 9  # 4 shards x 2 tiles + 1


def test_small_shards_scored_as_one_block_give_each_shard_its_own_parts(setup):
    index, rows, train, query, pre = setup
    damping = 0.3
    prepared = prepare_queries(query, "influence", pre, damping)
    records = sorted(index.committed().values(), key=lambda r: r.start)
    whiten = whiteners_for(pre, list(LAYERS), damping)
    # tile_rows 150 > 2 shards of 70 rows: blocks [0, 140), [140, 280), [280, 300).
    partial, parts = score_records(
        index, records, prepared, ScoreOptions(topk=7, tile_rows=150), whiten, "r/b", None, "r/b"
    )
    expected, _ = reference("influence", train, query, pre, damping)
    dense = torch.tensor(_assemble(index, parts["dense"]), dtype=torch.float64)
    assert (dense - expected).abs().max() / expected.abs().max() < 1e-5
    names = [f"r/b/dense/{r.shard_id}.{0:012d}.parquet" for r in records]
    assert sorted(parts["dense"]) == sorted(names)  # one part per shard, as when alone
    assert sorted(parts["self_influence"]) == sorted(
        f"r/b/self_influence/{r.shard_id}.parquet" for r in records
    )
    diag = pa.concat_tables(
        table_from_bytes(index.get_artifact(p)) for p in parts["self_influence"]
    ).sort_by("train_row")
    assert diag["train_key"].to_pylist() == [f"row-{r}" for r in range(300)]
    t = {n: torch.tensor(x, dtype=torch.float64) for n, x in train.items()}
    self_ref = sum(((t[n] @ torch.linalg.inv(_damped(t[n], damping))) * t[n]).sum(1) for n in t)
    np.testing.assert_allclose(diag["self_influence"].to_numpy(), self_ref.numpy(), rtol=1e-4)
    _, top_rows = decode(partial.proponents, 1)
    assert torch.equal(top_rows, brute_topk(expected, 7, True))


@pytest.mark.parametrize("kind", ["influence", "cosine"])
def test_layer_breakdown_sums_to_the_score_and_matches_each_layer_term(setup, kind):
    index, rows, train, query, pre = setup
    prepared = prepare_queries(query, kind, pre, 0.3)
    records = sorted(index.committed().values(), key=lambda r: r.start)
    pairs = np.array([[5, 299, -1], [0, 150, 71]] * 4 + [[70, 69, 1]], dtype=np.int64)
    pos, terms = breakdown_records(index, records, prepared, pairs)
    _, ref_terms = reference(kind, train, query, pre, 0.3)
    assert sorted(pos.tolist()) == [i for i in range(pairs.size) if pairs.flat[i] >= 0]
    for p, got in zip(pos, terms, strict=True):
        q, row = divmod(int(p), pairs.shape[1])
        want = [float(ref_terms[n][pairs[q, row], q]) for n in LAYERS]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_topk_table_lists_each_kind_query_and_rank_with_keys():
    ranked = {
        "proponent": (np.array([[3.0, 2.0], [1.0, -np.inf]]), np.array([[4, 1], [2, -1]])),
        "opponent": (np.array([[-1.0, 0.0], [1.0, np.inf]]), np.array([[0, 2], [2, -1]])),
    }
    pieces = list(
        results.topk_tables(
            np.array([10, 11]),
            ["q10", "q11"],
            ranked,
            (np.array([0, 1, 2, 4]), ["k0", "k1", "k2", "k4"]),
            {"proponent": {"a": np.ones((2, 2))}, "opponent": {"a": np.zeros((2, 2))}},
            rows_per_table=4,  # one query per piece
        )
    )
    assert len(pieces) == 2
    table = pa.concat_tables(pieces).to_pandas()
    assert table["query_key"].tolist() == ["q10"] * 4 + ["q11"] * 2
    assert table["kind"].tolist() == ["proponent", "proponent", "opponent", "opponent"] + [
        "proponent",
        "opponent",
    ]
    assert table["rank"].tolist() == [0, 1, 0, 1, 0, 0]
    assert table["train_key"].tolist() == ["k4", "k1", "k0", "k2", "k2", "k2"]
    assert table["score"].tolist() == [3.0, 2.0, -1.0, 0.0, 1.0, 1.0]
    assert table["score.a"].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("kept", [None, 150])
def test_scorer_returns_the_keys_of_the_rows_it_ranks_without_rereading_its_shards(
    setup, monkeypatch, kept
):
    # Keys kept as the shards are read; ranked rows past the kept ones are read back from
    # the shards, and only then. At 150 kept, the first two 70-row shards' keys are kept.
    from grass_dist.runtime import scoring

    index, *_, query, pre = setup
    records = sorted(index.committed().values(), key=lambda r: r.start)
    reads = []
    keys_of = scoring.keys_of
    monkeypatch.setattr(scoring, "keys_of", lambda *a: reads.append(a[2]) or keys_of(*a))
    if kept is not None:
        monkeypatch.setattr(scoring, "_KEPT_KEYS", kept)
    partial, _ = score_records(
        index, records, prepare_queries(query, "grad_dot"), ScoreOptions(topk=7, tile_rows=64)
    )
    ranked = np.unique(
        np.concatenate(
            [decode(k)[1].numpy().ravel() for k in (partial.proponents, partial.opponents)]
        )
    )
    rows, keys = partial.train_keys
    assert np.array_equal(rows, ranked) and len(ranked) > 7
    assert keys.to_pylist() == [f"row-{r}" for r in ranked]
    if kept is None:
        assert reads == []
    else:
        assert len(reads) == 1 and np.array_equal(reads[0], ranked[ranked >= 140])


def test_merged_partials_keep_the_keys_of_the_merged_ranking_only(setup):
    index, *_, query, pre = setup
    records = sorted(index.committed().values(), key=lambda r: r.start)
    prepared = prepare_queries(query, "grad_dot")
    opts = ScoreOptions(topk=5, tile_rows=64)
    whole, _ = score_records(index, records, prepared, opts)
    a, _ = score_records(index, records[::2], prepared, opts)
    b, _ = score_records(index, records[1::2], prepared, opts)
    merged = a.merge(b)
    assert torch.equal(merged.proponents, whole.proponents)
    assert torch.equal(merged.opponents, whole.opponents)
    assert np.array_equal(merged.train_keys[0], whole.train_keys[0])
    assert merged.train_keys[1].equals(whole.train_keys[1])
    assert len(merged.train_keys[0]) < len(a.train_keys[0]) + len(b.train_keys[0])
