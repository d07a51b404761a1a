"""The running top-k is exact: same rows and scores as a full sort, for any tiling."""

import numpy as np
import pytest
import torch

from grass_dist.scoring import topk
from grass_dist.scoring.score import Block, QuerySide, TileScorer, score_stream
from grass_dist.scoring.topk import EMPTY, RunningTopK, TopKPair, decode, encode, merge_keys


def brute(scores: torch.Tensor, k: int, sign: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, N) -> best k per query, higher (sign 1) or lower first, ties to the lower row."""
    idx = torch.argsort(scores * sign, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, idx), idx


def fold(top: TopKPair, scores: torch.Tensor, tile: int) -> TopKPair:
    """Add (Q, N) scores to `top` tile by tile; rows are the column numbers."""
    for lo in range(0, scores.shape[1], tile):
        part = scores[:, lo : lo + tile].contiguous()
        top.add(part, torch.arange(lo, lo + part.shape[1]))
    return top


def run(scores: torch.Tensor, k: int, sign: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = fold(TopKPair(scores.shape[0], k), scores, tile)
    return decode(top.finish()[0 if sign > 0 else 1], sign)


def assert_both_sides_exact(props: torch.Tensor, opps: torch.Tensor, scores, k: int) -> None:
    for keys, sign in ((props, 1), (opps, -1)):
        got, want = decode(keys, sign), brute(scores, k, sign)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_keys_order_like_scores_then_lower_rows_and_round_trip():
    values = torch.tensor([-float("inf"), -2.5, -0.0, 0.0, 1e-30, 3.0, 3.0, float("inf")])
    rows = torch.tensor([7, 3, 9, 2, 1, 5, 4, 0])
    keys = encode(values, rows)
    order = torch.argsort(keys, descending=True)
    assert rows[order].tolist() == [0, 4, 5, 1, 2, 9, 3, 7]  # -0.0 ties with +0.0
    back_values, back_rows = decode(keys)
    assert torch.equal(back_rows, rows)
    assert torch.equal(back_values, values + 0.0)
    assert decode(torch.tensor([EMPTY]))[1].tolist() == [-1]


@pytest.mark.parametrize("tile", [3, 37, 500, 5000])
@pytest.mark.parametrize("sign", [1, -1])
def test_running_topk_equals_a_full_sort_with_many_ties(tile, sign):
    gen = torch.Generator().manual_seed(tile)
    scores = torch.randn(23, 3000, generator=gen).round(decimals=1)  # many exact ties
    scores[:, 2000:2100] = scores[:, :100]
    want_v, want_r = brute(scores, 150, sign)
    got_v, got_r = run(scores, 150, sign, tile)
    assert torch.equal(got_r, want_r)
    assert torch.equal(got_v, want_v)


def test_descending_stream_keeps_the_pool_busy_and_stays_exact():
    # Each new tile beats everything so far: every tile's candidates flood the pool.
    scores = torch.arange(6000, dtype=torch.float32).repeat(4, 1) + torch.randn(4, 6000)
    for sign in (1, -1):
        got_v, got_r = run(scores, 200, sign, 64)
        want_v, want_r = brute(scores, 200, sign)
        assert torch.equal(got_r, want_r) and torch.equal(got_v, want_v)


def test_fewer_rows_than_k_leaves_marked_empty_slots():
    values, rows = run(torch.tensor([[0.5, -1.0, 2.0]]), 5, -1, 2)
    assert rows.tolist() == [[1, 0, 2, -1, -1]]
    assert values[0, :3].tolist() == [-1.0, 0.5, 2.0] and values[0, 3] == float("inf")


def test_an_empty_tile_changes_nothing():
    scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(11))
    top = TopKPair(3, 5)
    top.add(torch.zeros(3, 0), torch.zeros(0, dtype=torch.int64))
    assert_both_sides_exact(*fold(top, scores, 16).finish(), scores, 5)


def test_partials_from_any_split_of_the_rows_merge_to_the_same_answer():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(9, 4000, generator=gen).round(decimals=2)
    want = brute(scores, 64, 1)
    parts = []
    for lo, hi in ((0, 1300), (1300, 1301), (1301, 4000)):
        top = TopKPair(9, 64)
        top.add(scores[:, lo:hi].contiguous(), torch.arange(lo, hi))
        parts.append(top.finish()[0])
    merged = merge_keys(merge_keys(parts[2], parts[0], 64), parts[1], 64)
    got = decode(merged)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_floor_from_the_first_tile_keeps_results_exact():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(20, 20000, generator=gen).round(decimals=2)
    top = TopKPair(20, 50, expected_rows=20000)
    for lo in range(0, 20000, 2000):
        top.add(scores[:, lo : lo + 2000].contiguous(), torch.arange(lo, lo + 2000))
    assert top.floor is not None  # the floor was in force
    props, opps = top.finish()
    assert len(top.shortfall()) == 0
    for keys, sign in ((props, 1), (opps, -1)):
        got, want = decode(keys, sign), brute(scores, 50, sign)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_a_misleading_first_tile_is_caught_and_rescored_exactly():
    gen = torch.Generator().manual_seed(6)
    scores = torch.randn(6, 20000, generator=gen)
    scores[:3, :2000] *= 10  # queries 0-2: the first tile overstates their whole stream
    matrix = torch.eye(6)  # scores = matrix @ phi.T with phi = scores.T
    query = QuerySide(matrix, [("a", 0, 6)], "grad_dot")
    phi = scores.T.contiguous()

    def blocks():
        for lo in range(0, 20000, 5000):
            yield Block(np.arange(lo, lo + 5000), [], phi[lo : lo + 5000])

    partial = score_stream(query, blocks, 50, tile_rows=2000, expected_rows=20000)
    for keys, sign in ((partial.proponents, 1), (partial.opponents, -1)):
        got, want = decode(keys, sign), brute(scores, 50, sign)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    top = TopKPair(6, 50, expected_rows=20000)
    for lo in range(0, 20000, 2000):
        top.add(scores[:, lo : lo + 2000].contiguous(), torch.arange(lo, lo + 2000))
    top.finish()
    assert set(top.shortfall().tolist()) == {0, 1, 2}


@pytest.mark.parametrize(("k", "n_rows"), [(10, 100_000), (1024, 100_000), (1024, 600)])
def test_scorer_at_small_k_equals_a_full_sort_over_tiles_blocks_and_shards(k, n_rows):
    # Small integer entries make every float32 score exact (whatever the GEMM's blocking)
    # and tie often, so the reference is a plain sort of the float64 products.
    gen = torch.Generator().manual_seed(k + n_rows)
    matrix = torch.randint(-3, 4, (70, 8), generator=gen).float()
    phi = torch.randint(-3, 4, (n_rows, 8), generator=gen).float()
    scores = (matrix.double() @ phi.double().T).float()
    query = QuerySide(matrix, [("a", 0, 3), ("b", 3, 8)], "grad_dot")
    scorer = TileScorer(query, k, tile_rows=4096, expected_rows=n_rows)
    for lo in range(0, n_rows, 30_000):  # shards; tiles of 4096 rows, 3 blocks of queries
        scorer.add(np.arange(lo, min(lo + 30_000, n_rows)), phi[lo : lo + 30_000])
    partial = scorer.finish()
    assert (scorer.top.floor is not None) == (n_rows > k * 20)
    assert len(scorer.top.shortfall()) == 0
    for keys, sign in ((partial.proponents, 1), (partial.opponents, -1)):
        got_v, got_r = decode(keys, sign)
        want_v, want_r = brute(scores, k, sign)
        n = min(k, n_rows)
        assert torch.equal(got_r[:, :n], want_r) and torch.equal(got_v[:, :n], want_v)
        assert (got_r[:, n:] == -1).all()


@pytest.mark.parametrize(("k", "rises"), [(10, False), (300, True)])  # k=10: kth rises first
@pytest.mark.parametrize("filter_rate", [0.0, 2.0])  # 0: always compare each score; 2: groups
def test_either_filter_with_a_rising_floor_equals_a_full_sort(monkeypatch, k, rises, filter_rate):
    monkeypatch.setattr(topk, "MASK_PASS_RATE", filter_rate)
    gen = torch.Generator().manual_seed(k)
    scores = torch.randn(9, 30_000, generator=gen).round(decimals=2)  # ties across tiles
    top = TopKPair(9, k, expected_rows=30_000)
    fold(top, scores, 2999)  # 2999: a tile's last columns fall outside the whole groups
    first_floor = fold(TopKPair(9, k, expected_rows=30_000), scores[:, :2999], 2999).floor
    assert bool((top.floor[0] > first_floor[0]).all()) == rises
    assert bool((top.floor[1] < first_floor[1]).all()) == rises
    props, opps = top.finish()
    assert len(top.shortfall()) == 0
    assert_both_sides_exact(props, opps, scores, k)


def test_rows_that_fill_are_merged_and_stay_exact(monkeypatch):
    merges = []
    merge = RunningTopK._merge
    monkeypatch.setattr(RunningTopK, "_merge", lambda self, w: merges.append(w) or merge(self, w))
    gen = torch.Generator().manual_seed(8)
    scores = torch.randn(4, 20_000, generator=gen)
    top = fold(TopKPair(4, 50), scores, 500)  # ~10% of each tile passes: rows of 178 fill
    assert len(merges) > 3
    assert_both_sides_exact(*top.finish(), scores, 50)


def test_a_tile_with_more_candidates_than_free_slots_stays_exact():
    gen = torch.Generator().manual_seed(9)
    first = torch.rand(3, 1000, generator=gen)
    second = torch.cat([torch.rand(3, 300) + 2, torch.rand(3, 700) - 1], dim=1)
    second = second[:, torch.randperm(1000, generator=gen)]  # 300 new best among 133 slots
    scores = torch.cat([first, second], dim=1)
    top = fold(TopKPair(3, 5), scores, 1000)
    assert_both_sides_exact(*top.finish(), scores, 5)


@pytest.mark.parametrize("sign", [1, -1])
def test_rank_score_is_the_rank_th_best_held(sign):
    gen = torch.Generator().manual_seed(10)
    scores = torch.randn(3, 400, generator=gen)
    side = RunningTopK(3, 50, sign)
    side.add_dense(scores, torch.arange(400))
    want = brute(scores, 20, sign)[0][:, 19:] * sign
    assert torch.equal(side.rank_score(20), want)
    assert (side.rank_score(60) == -float("inf")).all()  # only 50 held
