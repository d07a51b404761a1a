"""Every baseline compressor against its explicit dense-matrix definition on small sizes."""

import math

import pytest
import torch

from grass_dist.compress import (
    FlatShape,
    GaussianJL,
    RademacherJL,
    build_compressors,
    compressor_class,
    methods,
)
from grass_dist.config import CompressionConfig
from grass_dist.gradients.capture import resolve_layers
from grass_dist.gradients.computer import GradientComputer
from grass_dist.tasks.classifier import ClassificationTask
from tests.helpers import SeqModel, layer_grad, mlp, per_sample_grads


def _case(three_d: bool):
    torch.manual_seed(2)
    model = SeqModel(d_in=9, hidden=11) if three_d else mlp(d_in=9, hidden=11)
    x = torch.randn(5, 3, 9) if three_d else torch.randn(5, 9)
    return model, x, torch.randint(0, 3, (5,))


def _phi(model, x, y, **cfg):
    comps = build_compressors(CompressionConfig(**cfg), resolve_layers(model, None))
    return GradientComputer(model, ClassificationTask(), comps).phi_batch([x, y]), comps


def _vec_grads(model, x, y):
    exact = per_sample_grads(model, x, y)
    return {n: layer_grad(exact, n).reshape(x.shape[0], -1) for n in resolve_layers(model, None)}


@pytest.mark.parametrize("three_d", [False, True])
def test_logra_is_vec_g_times_kron_of_projections(three_d):
    model, x, y = _case(three_d)
    phi, comps = _phi(model, x, y, method="logra", k=6, seed=3)
    for layer, v in _vec_grads(model, x, y).items():
        c = comps[layer]
        assert c.out_dim == 6 and c.p_out.shape[0] * c.p_in.shape[0] == 6
        want = v @ torch.kron(c.p_out, c.p_in).T
        torch.testing.assert_close(phi[layer], want, rtol=1e-4, atol=1e-5)


def test_logra_projection_entries_and_explicit_sizes():
    model = mlp(d_in=40, hidden=50)
    comps = build_compressors(
        CompressionConfig(method="logra", k=64, proj_out=4, proj_in=16, seed=1),
        resolve_layers(model, ["fc1"]),
    )
    p_out = comps["fc1"].p_out
    assert p_out.shape == (4, 50) and comps["fc1"].p_in.shape == (16, 41)
    # N(0, 1) / sqrt(4): variance 1/4 over 200 entries.
    assert abs(float(p_out.var()) - 0.25) < 0.1
    cfg = CompressionConfig(method="logra", k=64)
    auto = build_compressors(cfg, resolve_layers(model, ["fc1"]))
    assert (auto["fc1"].p_out.shape[0], auto["fc1"].p_in.shape[0]) == (8, 8)


@pytest.mark.parametrize("method", ["gaussian", "rademacher"])
@pytest.mark.parametrize("three_d", [False, True])
def test_dense_jl_is_vec_g_times_r_over_sqrt_k(method, three_d):
    model, x, y = _case(three_d)
    phi, comps = _phi(model, x, y, method=method, k=7, seed=4)
    for layer, v in _vec_grads(model, x, y).items():
        r = comps[layer].matrix()
        assert r.shape == (v.shape[1], 7)
        if method == "rademacher":
            assert set(r.unique().tolist()) == {-1.0, 1.0}
        torch.testing.assert_close(phi[layer], v @ r / math.sqrt(7), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [GaussianJL, RademacherJL])
def test_chunked_dense_jl_equals_unchunked(cls):
    shape = FlatShape("Fake", (("w", (2500,)), ("b", (700,))))  # 3200 rows: 4 blocks
    v = torch.randn(3, 3200)
    whole = cls("L", shape, 16, seed=5, chunk_rows=10**6, cache_bytes=0)
    r = whole.matrix()
    ref = v.double() @ r.double() / 4.0
    for chunk_rows in (1, 1024, 2048, 3000):
        for cache_bytes in (0, 1 << 30):
            c = cls("L", shape, 16, seed=5, chunk_rows=chunk_rows, cache_bytes=cache_bytes)
            assert torch.equal(c.matrix(), r)  # the same R however it is generated
            torch.testing.assert_close(c.compress_flat(v).double(), ref, rtol=1e-4, atol=1e-4)
    other = cls("L2", shape, 16, seed=5)  # another layer, another R
    assert not torch.equal(other.matrix(), r)


@pytest.mark.parametrize("three_d", [False, True])
def test_sjlt_only_is_vec_g_times_sjlt_matrix(three_d):
    model, x, y = _case(three_d)
    phi, comps = _phi(model, x, y, method="sjlt", k=8, seed=6, sjlt_c=2)
    for layer, v in _vec_grads(model, x, y).items():
        s = comps[layer].sjlt
        assert s.d == v.shape[1]
        torch.testing.assert_close(phi[layer], v @ s.matrix(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("three_d", [False, True])
def test_random_mask_is_k_coordinates_of_vec_g(three_d):
    model, x, y = _case(three_d)
    phi, comps = _phi(model, x, y, method="random_mask", k=20, seed=7)
    for layer, v in _vec_grads(model, x, y).items():
        idx = comps[layer].idx
        assert idx.numel() == 20 and torch.equal(idx, idx.sort().values)
        torch.testing.assert_close(phi[layer], v[:, idx], rtol=1e-5, atol=1e-6)
    # The bias column is reachable: with k = all entries, the mask is the whole of vec(G).
    out = resolve_layers(model, None)
    last = list(out)[-1]
    full, comps = _phi(model, x, y, method="random_mask", k=out[last].numel, seed=7)
    torch.testing.assert_close(full[last], _vec_grads(model, x, y)[last], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("three_d", [False, True])
def test_flat_grass_on_linear_is_sjlt_of_masked_vec_g(three_d):
    model, x, y = _case(three_d)
    phi, comps = _phi(model, x, y, method="grass", k=5, blowup=3, seed=8)
    for layer, v in _vec_grads(model, x, y).items():
        c = comps[layer]
        assert c.idx.numel() == 15
        want = v[:, c.idx] @ c.sjlt.matrix()
        torch.testing.assert_close(phi[layer], want, rtol=1e-4, atol=1e-5)


def test_registry_lists_every_method_and_specs_are_distinct():
    assert set(methods()) >= {
        "identity",
        "factgrass",
        "logra",
        "gaussian",
        "rademacher",
        "sjlt",
        "random_mask",
        "grass",
        "selective_factgrass",
        "selective_grass",
        "selective_mask",
    }
    model = mlp(d_in=9, hidden=11)
    specs = {}
    for m in ("identity", "factgrass", "logra", "gaussian", "rademacher", "sjlt", "grass"):
        comps = build_compressors(CompressionConfig(method=m, k=4), resolve_layers(model, None))
        specs[m] = comps["fc1"].spec()
        assert specs[m]["method"] == m and compressor_class(m).method == m
    assert len({str(sorted(s.items())) for s in specs.values()}) == len(specs)
