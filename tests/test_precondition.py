"""The preconditioner against dense float64 (H + lambda I)^-1: Cholesky and eigenbasis paths,
the store formats (including files written before format 2), the float32 Fisher sum and
the parallel per-layer factorisation and the Ray build of the whole preconditioner."""

import hashlib
import io
import json
import re
import struct

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import save as st_save

from grass_dist.errors import CorruptPreconditionerError, NonFiniteShardError
from grass_dist.index import GradientIndex, shards
from grass_dist.runtime.fisher import (
    balanced_groups,
    build_fisher,
    fisher_part,
    fisher_source,
    layer_map,
)
from grass_dist.runtime.scoring import shard_groups
from grass_dist.scoring.fisher_sum import FisherSum
from grass_dist.scoring.packing import (
    symmetric_,
)
from grass_dist.scoring.precondition import (
    LayerFactor,
    Preconditioner,
    cholesky_factor,
    eigen_factor,
    relative_damping,
    serial_map,
    stored_source,
)
from tests.synthetic import phi_rows, write_index

LAYERS = {"a": 12, "b": 7}
DELTAS = (0.0, 1e-3, 0.3)


def realistic_phi(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Rows with a power-law spectrum (as compressed gradients have) and a shared mean."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    scale = torch.arange(1, k + 1, dtype=torch.float64) ** -0.5
    x = (torch.randn(n, k, generator=gen, dtype=torch.float64) * scale) @ basis.T
    return (x + 0.05 * torch.randn(k, generator=gen, dtype=torch.float64)).float().numpy()


@pytest.fixture(scope="module")
def train():
    return {name: realistic_phi(200, k, seed) for seed, (name, k) in enumerate(LAYERS.items())}


def dense_inverse(x: np.ndarray, delta: float) -> torch.Tensor:
    """(H + lambda I)^-1 from explicit float64 matrices."""
    x64 = torch.tensor(x, dtype=torch.float64)
    h = x64.T @ x64 / x64.shape[0]
    lam = delta * torch.trace(h) / h.shape[0]
    return torch.linalg.inv(h + lam * torch.eye(h.shape[0], dtype=torch.float64))


def exact_fisher(phi: dict[str, np.ndarray]) -> FisherSum:
    """phi^T phi in float64 GEMMs: tests of the factorisations leave the float32 sum out."""
    sums = {name: x.astype(np.float64).T @ x.astype(np.float64) for name, x in phi.items()}
    return FisherSum(sums, next(iter(phi.values())).shape[0])


def format1_bytes(fisher: FisherSum) -> bytes:
    """A preconditioner file as written before format 2: eigvals / eigvecs per layer."""
    tensors = {"n": torch.tensor([fisher.n], dtype=torch.int64)}
    for name, s in fisher.sums.items():
        e, u = torch.linalg.eigh(torch.from_numpy(s / fisher.n))
        tensors[f"{name}.eigvals"] = e.clamp_min(0.0).contiguous()
        tensors[f"{name}.eigvecs"] = u.contiguous()
    return st_save(tensors, metadata={"layers": ",".join(fisher.sums)})


def _check_against_dense(pre: Preconditioner, train, query) -> None:
    for delta in DELTAS:
        got = pre.precondition_queries(query, delta)
        for name, x in train.items():
            inv = dense_inverse(x, delta)
            want = torch.tensor(query[name], dtype=torch.float64) @ inv
            np.testing.assert_allclose(got[name], want.float().numpy(), rtol=1e-5, atol=1e-5)
            w = pre.layers[name].whitener(delta)
            torch.testing.assert_close(w @ w.T, inv, rtol=1e-9, atol=1e-9 * float(inv.abs().max()))


def by_path(fisher: FisherSum, path: str) -> Preconditioner:
    """The preconditioner of `fisher` applied through `path`: cholesky (the default), its
    eigendecomposition, or a format-1 file (eigendecomposition only)."""
    if path == "format 1":
        return Preconditioner.from_bytes(format1_bytes(fisher))
    pre = Preconditioner.from_fisher(fisher)
    return pre.eigendecompose() if path == "eigen" else pre


@pytest.mark.parametrize("path", ["cholesky", "eigen", "format 1"])
def test_every_path_applies_the_dense_inverse(train, path):
    fisher = exact_fisher(train)
    pre = by_path(fisher, path)
    query = {name: realistic_phi(9, k, 7) for name, k in LAYERS.items()}
    _check_against_dense(pre, train, query)
    assert all((f.eigen is None) == (path == "cholesky") for f in pre.layers.values())


def test_cholesky_and_eigen_paths_agree(train):
    query = {name: realistic_phi(9, k, 8) for name, k in LAYERS.items()}
    chol = Preconditioner.from_fisher(exact_fisher(train))
    eig = Preconditioner.from_fisher(exact_fisher(train)).eigendecompose()
    for delta in DELTAS:
        a, b = chol.precondition_queries(query, delta), eig.precondition_queries(query, delta)
        for name in LAYERS:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6)
            wa, wb = chol.layers[name].whitener(delta), eig.layers[name].whitener(delta)
            torch.testing.assert_close(wa @ wa.T, wb @ wb.T, rtol=1e-8, atol=1e-10)


def format2_bytes(pre: Preconditioner) -> bytes:
    """A preconditioner file as written in format 2: H and L as full (k, k) matrices."""
    tensors = {"n": torch.tensor([pre.n], dtype=torch.int64)}
    for name, f in pre.layers.items():
        tensors[f"{name}.fisher"] = f.fisher.contiguous()
        tensors[f"{name}.cholesky"] = f.cholesky[pre.delta].contiguous()
    meta = {"format": "2", "layers": ",".join(pre.layers), "delta": repr(pre.delta)}
    return st_save(tensors, metadata={"grass_dist": json.dumps(meta, sort_keys=True)})


@pytest.mark.parametrize("written", ["format 3", "format 2"])
def test_round_trip_keeps_h_and_the_factor_at_its_damping(train, written):
    pre = Preconditioner.from_fisher(exact_fisher(train)).factorise(1e-3)
    data = pre.to_bytes() if written == "format 3" else format2_bytes(pre)
    back = Preconditioner.from_bytes(data)
    assert back.n == 200 and back.delta == 1e-3 and list(back.layers) == list(LAYERS)
    for name, f in pre.layers.items():
        assert torch.equal(back.layers[name].fisher, f.fisher)
        assert torch.equal(back.layers[name].cholesky[1e-3], f.cholesky[1e-3])
    unfactorised = Preconditioner.from_bytes(
        Preconditioner.from_fisher(exact_fisher(train)).to_bytes()
    )
    assert unfactorised.delta is None
    assert all(not f.cholesky for f in unfactorised.layers.values())


def test_a_factor_computed_here_or_loaded_applies_the_inverse_to_the_same_bits():
    # At k=300 the triangular solves' rounding depends on the factor's memory layout (LAPACK
    # gives it column-major, a file row-major): every factor is kept row-major.
    pre = Preconditioner.from_fisher(FisherSum.of({"a": realistic_phi(400, 300, 3)}))
    here = pre.factorise(0.1).layers["a"]
    loaded = Preconditioner.from_bytes(pre.to_bytes()).layers["a"]
    q = torch.tensor(realistic_phi(9, 300, 4))
    assert torch.equal(here.inverse_apply(q, 0.1), loaded.inverse_apply(q, 0.1))


def test_a_process_kept_up_across_dampings_holds_one_set_of_factors(train):
    pre = Preconditioner.from_fisher(exact_fisher(train))
    q = {n: torch.tensor(realistic_phi(3, k, 9)) for n, k in LAYERS.items()}
    first = {n: f.inverse_apply(q[n], 0.1) for n, f in pre.factorise(0.1).layers.items()}
    pre.keep_factors(0.5).factorise(0.5)
    assert all(list(f.cholesky) == [0.5] for f in pre.layers.values())
    pre.keep_factors(0.1).factorise(0.1)  # factorised again: the same bits as the first time
    for name, f in pre.layers.items():
        assert list(f.cholesky) == [0.1]
        assert torch.equal(f.inverse_apply(q[name], 0.1), first[name])


def test_format_1_files_give_the_answers_they_gave(train):
    """The old formula U diag(1 / (e + lambda)) U^T, on the stored eigenbasis, exactly."""
    fisher = exact_fisher(train)
    pre = Preconditioner.from_bytes(format1_bytes(fisher))
    query = {name: realistic_phi(4, k, 3) for name, k in LAYERS.items()}
    got = pre.precondition_queries(query, 0.3)
    for name, f in pre.layers.items():
        e, u = f.eigen
        lam = 0.3 * float(e.sum()) / f.k
        want = ((torch.tensor(query[name]).double() @ u) * (1.0 / (e + lam))) @ u.T
        np.testing.assert_array_equal(got[name], want.float().numpy())
    with pytest.raises(ValueError, match="cannot be saved again"):
        pre.to_bytes()


def test_a_file_records_the_sha256_of_its_data(train):
    data = Preconditioner.from_fisher(exact_fisher(train)).factorise(1e-3).to_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8:start])["__metadata__"]["grass_dist"])
    assert meta["sha256"] == hashlib.sha256(data[start:]).hexdigest()


@pytest.mark.parametrize("damage", ["a changed float", "zeroed tail", "cut short", "no header"])
def test_a_damaged_file_is_refused_as_damaged_not_read(train, damage):
    """A stored preconditioner is reused without a pass over the index: a file damaged at
    rest must not be read as another H."""
    data = bytearray(Preconditioner.from_fisher(exact_fisher(train)).factorise(1e-3).to_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    if damage == "a changed float":  # still a well-formed file, of another H
        data[start + 64 : start + 72] = struct.pack("<d", 3.0)
    elif damage == "zeroed tail":
        data[-40:] = bytes(40)
    elif damage == "cut short":
        del data[-40:]
    else:
        data = data[start:]
    said = "does not match the sha256" if damage != "no header" else "no readable safetensors"
    with pytest.raises(CorruptPreconditionerError, match=said):
        Preconditioner.from_bytes(bytes(data))
    if damage == "no header":
        with pytest.raises(CorruptPreconditionerError, match="header is unreadable"):
            stored_source(io.BytesIO(bytes(data)))


def test_a_newer_store_format_is_refused_with_the_fix():
    data = st_save({"n": torch.tensor([1])}, metadata={"format": "9", "layers": "a"})
    with pytest.raises(ValueError, match="upgrade grass_dist or rebuild"):
        Preconditioner.from_bytes(data)


@pytest.mark.parametrize("path", ["cholesky", "eigen", "format 1"])
def test_a_singular_h_at_zero_damping_is_a_clear_error(path):
    phi = {"a": realistic_phi(5, 12)}  # 5 rows: H has rank 5 of 12
    fisher = exact_fisher(phi)
    pre = by_path(fisher, path)
    with pytest.raises(ValueError, match="singular.*set precondition.damping > 0"):
        pre.precondition_queries(phi, 0.0)
    assert np.isfinite(pre.precondition_queries(phi, 1e-3)["a"]).all()


def test_a_small_damping_that_rounding_leaves_indefinite_goes_through_the_clipped_eigenbasis():
    # H summed in float32 (as preconditioner files written before the sums were float64
    # hold it) from 30 rows of 200 dimensions has eigenvalues a rounding error below 0,
    # which delta=1e-7 (the damping grid's first value) does not lift: the Cholesky
    # factorisation fails although lambda > 0. H is PSD, so it is applied through its
    # eigendecomposition clipped at 0, not refused as singular.
    phi = {"a": realistic_phi(30, 200, seed=5)}
    x = torch.from_numpy(phi["a"])
    pre = Preconditioner({"a": LayerFactor(symmetric_((x.T @ x).double()) / 30)}, 30)
    h = pre.layers["a"].fisher
    damped = h + relative_damping(h, 1e-7) * torch.eye(200, dtype=h.dtype)
    assert int(torch.linalg.cholesky_ex(damped)[1]) != 0  # the case at hand
    assert isinstance(cholesky_factor(h, 1e-7), tuple)

    got = pre.precondition_queries(phi, 1e-7)["a"]
    e, u = np.linalg.eigh(h.numpy())  # an independent reference from the same H
    inv = u @ np.diag(1.0 / (np.clip(e, 0, None) + relative_damping(h, 1e-7))) @ u.T
    want = phi["a"].astype(np.float64) @ inv
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6 * np.abs(want).max())
    layer = pre.layers["a"]
    w = layer.whitener(1e-7).numpy()
    np.testing.assert_allclose(w @ w.T, inv, rtol=1e-4, atol=1e-7 * np.abs(inv).max())
    # factorise (as the reducer does) and a stored and loaded copy give the same bits.
    built = Preconditioner({"a": LayerFactor(h.clone())}, 30).factorise(1e-7)
    loaded = Preconditioner.from_bytes(built.to_bytes())
    for p in (built, loaded):
        np.testing.assert_array_equal(p.precondition_queries(phi, 1e-7)["a"], got)
    assert np.isfinite(built.precondition_queries(phi, 0.1)["a"]).all()  # other deltas too


def test_layers_split_into_groups_of_balanced_work():
    sizes = {"big": 40, "m1": 30, "m2": 30, "s1": 10, "s2": 10, "s3": 10}
    groups = balanced_groups(sizes, 3)
    assert sorted(n for g in groups for n in g) == sorted(sizes)
    assert groups[0] == ["big"] and len(groups) == 3
    assert balanced_groups(sizes, 10) == [[n] for n in sizes]  # never an empty group


@pytest.mark.integration
def test_parallel_layer_factorisations_equal_the_serial_ones(ray_session):
    fishers = {
        f"l{i}": FisherSum.of({"x": realistic_phi(60, 5 + i, i)}).matrix("x") for i in range(7)
    }
    tensors = {n: torch.from_numpy(s / 60) for n, s in fishers.items()}
    run = layer_map(3)
    chol = run(lambda h: cholesky_factor(h, 1e-3), tensors)
    assert list(chol) == list(tensors)
    for name, factor in serial_map(lambda h: cholesky_factor(h, 1e-3), tensors).items():
        assert torch.equal(chol[name], factor)
    eig = run(eigen_factor, tensors)
    for name, (e, u) in serial_map(eigen_factor, tensors).items():
        assert torch.equal(eig[name][0], e) and torch.equal(eig[name][1], u)
    with pytest.raises(ValueError, match="singular"):
        run(lambda h: cholesky_factor(h, 0.0), {"low": torch.zeros(4, 4, dtype=torch.float64)})


def test_saved_preconditioner_has_one_metadata_entry():
    # safetensors orders several metadata entries differently from process to process; one
    # entry keeps the same preconditioner the same bytes wherever it is built.
    rng = np.random.default_rng(4)
    fisher = FisherSum.of({"a": rng.standard_normal((40, 6), dtype=np.float32)})
    data = Preconditioner.from_fisher(fisher).factorise(0.1).to_bytes()
    size = int.from_bytes(data[:8], "little")
    assert list(json.loads(data[8 : 8 + size])["__metadata__"]) == ["grass_dist"]
    assert Preconditioner.from_bytes(data).delta == 0.1


@pytest.mark.integration
@pytest.mark.parametrize(
    ("layers", "delta"),
    [({"a": 9}, 0.1), ({"a": 9, "b": 5, "c": 12}, 1e-3), ({"a": 6, "b": 4}, None)],
)
def test_built_on_ray_equals_the_serial_build_bit_for_bit(ray_session, tmp_path, layers, delta):
    # Map tasks over shard groups, their per-layer partial sums handed task to task to the
    # factorisation tasks: the same bits as summing the groups' FisherSums in order here.
    index = write_index(str(tmp_path / "index"), 1100, layers, shard_rows=100)
    built = build_fisher(index, 3, True, delta)
    records = sorted(index.committed().values(), key=lambda r: r.start)
    total = FisherSum({}, 0)
    for group in shard_groups(records, 3):
        total = total + FisherSum.accumulate(index.read(r).phi for r in group)
    want = Preconditioner.from_fisher(total)
    want.source = fisher_source(records)  # what it was summed from, stored with it
    if delta is not None:
        want.factorise(delta)
    assert (built.n, built.delta, list(built.layers)) == (1100, delta, list(layers))
    for name, layer in want.layers.items():
        assert torch.equal(built.layers[name].fisher, layer.fisher)
        assert built.layers[name].cholesky.keys() == layer.cholesky.keys()
        for d, factor in layer.cholesky.items():
            assert torch.equal(built.layers[name].cholesky[d], factor)
    assert built.to_bytes() == want.to_bytes()


@pytest.mark.integration
def test_an_empty_index_has_no_preconditioner(ray_session, tmp_path):
    url = str(tmp_path / "index")
    index = write_index(url, 0, {"a": 4}, shard_rows=10)
    with pytest.raises(ValueError, match="empty index"):
        build_fisher(index, 2, True, 0.1)


def _index_with_an_overflowed_shard(url: str, monkeypatch) -> GradientIndex:
    """A float16 index of 300 rows whose shard 000000200 holds inf, as the writer stored a
    gradient larger than 65504 before it checked the cast."""
    index = write_index(url, 200, LAYERS, shard_rows=100, dtype="float16")
    with monkeypatch.context() as older:
        older.setattr(shards, "check_storable", lambda *args: None, raising=False)
        phi = phi_rows(200, 300, LAYERS)
        phi["b"][7, 2] = 1e6
        rows = np.arange(200, 300)
        keys = [f"row-{r}" for r in rows]
        index.commit([index.write_shard("000000200", 200, 300, rows, keys, phi)])
    return index


def test_a_shard_holding_inf_is_named_with_the_fix_before_any_factorisation(tmp_path, monkeypatch):
    index = _index_with_an_overflowed_shard(str(tmp_path / "index"), monkeypatch)
    records = sorted(index.committed().values(), key=lambda r: r.start)
    fisher_part(index, records[:2], True)  # the shards before it are fine
    with pytest.raises(NonFiniteShardError) as refused:
        fisher_part(index, records, True)
    said = str(refused.value)
    assert re.search(
        r"holds NaN or inf gradients in shard 000000200 \(rows 200\.\.299, file .*"
        r"shards/000000200/\w+\.parquet\)",
        said,
    )
    assert "index.dtype=float16" in said
    assert said.endswith(
        "Fix: rebuild the index with index.dtype=bfloat16 (or float32) in a new store.url "
        "(an index keeps its dtype)."
    )


@pytest.mark.integration
def test_a_shard_holding_inf_stops_the_preconditioner_on_ray_as_itself(
    ray_session, tmp_path, monkeypatch
):
    # Not torch's "linalg.eigh: The algorithm failed to converge" from a factorisation task.
    index = _index_with_an_overflowed_shard(str(tmp_path / "index"), monkeypatch)
    with pytest.raises(NonFiniteShardError, match=r"in shard 000000200 \(rows 200\.\.299"):
        build_fisher(index, 2, True, 0.1)


@pytest.mark.integration
def test_layer_factors_cross_processes_as_shared_read_only_arrays(ray_session, recwarn):
    # Ray hands numpy arrays over without copying them (read-only); the factors come back
    # equal and usable, with no "not writable" warning.
    h = torch.from_numpy(exact_fisher({"a": realistic_phi(50, 6)}).matrix("a") / 50)
    layer = LayerFactor(h, eigen_factor(h), {0.1: cholesky_factor(h, 0.1)})
    back = ray.get(ray.put(layer))
    assert torch.equal(back.fisher, h) and torch.equal(back.cholesky[0.1], layer.cholesky[0.1])
    assert all(torch.equal(x, y) for x, y in zip(back.eigen, layer.eigen, strict=True))
    q = torch.ones(2, 6, dtype=torch.float64)
    assert torch.equal(back.inverse_apply(q, 0.1), layer.inverse_apply(q, 0.1))
    assert not [w for w in recwarn if "writable" in str(w.message)]
