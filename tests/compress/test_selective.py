"""Selective Mask: learned masks rank inner products better than random masks of that size."""

import pytest
import torch

from grass_dist.compress import (
    GradSample,
    IdentityCompressor,
    build_compressor,
    linear_gradient,
    random_mask,
)
from grass_dist.compress.learned import (
    SelectiveFactGraSSCompressor,
    SelectiveGraSSCompressor,
    SelectiveMaskCompressor,
)
from grass_dist.compress.selective import factor_inner, flat_inner, spearman_rows
from grass_dist.config import CompressionConfig, SelectiveConfig
from grass_dist.data import digits
from grass_dist.errors import ConfigError, FingerprintMismatchError
from grass_dist.gradients.capture import resolve_layers
from grass_dist.gradients.computer import GradientComputer
from grass_dist.gradients.learned_state import gradient_sample, sample_rows
from grass_dist.models.digits import digits_mlp
from grass_dist.runtime.seeding import generator
from grass_dist.tasks.classifier import ClassificationTask
from tests.helpers import SeqModel

FIT = SelectiveConfig(epochs=150, check_every=25)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The fits are many tiny ops: on a busy 2-core machine thread hand-offs dominate them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def grads(tmp_path_factory):
    """Factors of fc1 for 192 fit rows, 48 held-out rows, and 200 + 100 evaluation rows."""
    cache = str(tmp_path_factory.mktemp("cache"))
    model = digits_mlp(hidden=[32], epochs=10, n_train=500, cache_dir=cache)
    train, query = digits("train", 500, 100), digits("query", 500, 100)
    shape = resolve_layers(model, ["fc1"])["fc1"]
    comp = GradientComputer(model, ClassificationTask(), {"fc1": IdentityCompressor("fc1", shape)})

    def factors(ds, rows):
        return gradient_sample(comp, ds, list(rows), 128)["fc1"]

    return {
        "shape": shape,
        "sample": GradSample(factors(train, range(192)), factors(train, range(192, 240))),
        "eval_train": linear_gradient(*factors(train, range(300, 500)), shape),
        "eval_query": linear_gradient(*factors(query, range(100)), shape),
    }


def _rank_agreement(grads, flat_idx: torch.Tensor) -> float:
    """Mean Spearman over queries of masked vs exact inner products with the train rows."""
    q, t = grads["eval_query"], grads["eval_train"]
    return float(spearman_rows(q @ t.T, q[:, flat_idx] @ t[:, flat_idx].T).mean())


def _block(shape, idx_out, idx_in):
    return (idx_out[:, None] * shape.cols + idx_in[None, :]).flatten()


def test_selective_factorised_mask_beats_random_masks_of_the_same_size(grads):
    shape = grads["shape"]
    cfg = CompressionConfig(k=16, method="selective_factgrass", selective=FIT)
    state = SelectiveFactGraSSCompressor.fit(cfg, "fc1", shape, grads["sample"])
    learned = build_compressor(cfg, "fc1", shape, state)
    ko, ki = learned.idx_out.numel(), learned.idx_in.numel()
    assert (ko, ki) == (8, 8)
    got = _rank_agreement(grads, _block(shape, learned.idx_out, learned.idx_in))
    rand = []
    for seed in range(5):
        factgrass = build_compressor(CompressionConfig(k=16, blowup=4, seed=seed), "fc1", shape)
        rand.append(_rank_agreement(grads, _block(shape, factgrass.idx_out, factgrass.idx_in)))
    print(f"factorised selective {got:.3f} vs random {[round(r, 3) for r in rand]}")
    assert got > rand[0] and got > sum(rand) / len(rand) + 0.05


def test_selective_flat_mask_beats_random_masks_of_the_same_size(grads):
    shape = grads["shape"]
    cfg = CompressionConfig(k=32, method="selective_mask", selective=FIT)
    state = SelectiveMaskCompressor.fit(cfg, "fc1", shape, grads["sample"])
    learned = build_compressor(cfg, "fc1", shape, state)
    got = _rank_agreement(grads, learned.idx)
    rand = [
        _rank_agreement(grads, random_mask(shape.numel, 32, generator(seed, "fc1", "mask")))
        for seed in range(5)
    ]
    print(f"flat selective {got:.3f} vs random {[round(r, 3) for r in rand]}")
    assert got > rand[0] and got > sum(rand) / len(rand) + 0.05


def test_fit_is_deterministic_and_state_round_trips(grads):
    shape = grads["shape"]
    cfg = CompressionConfig(
        k=8, method="selective_grass", selective=SelectiveConfig(epochs=20, check_every=5)
    )
    a = SelectiveGraSSCompressor.fit(cfg, "fc1", shape, grads["sample"])
    assert a == SelectiveGraSSCompressor.fit(cfg, "fc1", shape, grads["sample"])
    comp = build_compressor(cfg, "fc1", shape, a)
    assert comp.idx.numel() == 32 and comp.spec()["state_sha256"]
    v = grads["eval_query"][:5]
    torch.testing.assert_close(comp.compress_flat(v), v[:, comp.idx] @ comp.sjlt.matrix())
    with pytest.raises(FingerprintMismatchError, match="need 64 sorted indices"):
        build_compressor(CompressionConfig(k=16, method="selective_grass"), "fc1", shape, a)
    with pytest.raises(ConfigError, match="is learned from training gradients"):
        build_compressor(cfg, "fc1", shape)


def test_factor_inner_products_match_explicit_gradients():
    torch.manual_seed(0)
    shape = resolve_layers(SeqModel(), ["proj"])["proj"]
    for t in (1, 3):
        tr = (torch.randn(6, t, shape.d_in), torch.randn(6, t, shape.d_out))
        he = (torch.randn(4, t, shape.d_in), torch.randn(4, t, shape.d_out))
        w = [torch.rand(shape.d_out), torch.rand(shape.cols)]
        got = factor_inner(tr, he, shape)(w)
        weight = (w[0][:, None] * w[1][None, :]).flatten()
        want = flat_inner(linear_gradient(*tr, shape), linear_gradient(*he, shape))([weight])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sample_rows_are_distinct_seeded_and_shrink_to_small_sets():
    cfg = CompressionConfig(selective=SelectiveConfig(samples=50, holdout=10, seed=3))
    fit, held = sample_rows(cfg, 1000)
    assert len(fit) == 50 and len(held) == 10 and not set(fit) & set(held)
    assert (fit, held) == sample_rows(cfg, 1000)
    fit, held = sample_rows(cfg, 20)
    assert len(held) == 5 and len(fit) == 15
