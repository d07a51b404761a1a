import itertools
import math

import pytest
import torch

from grass_dist.compress import SJLT, build_compressors, factor_sizes, random_mask
from grass_dist.config import CompressionConfig
from grass_dist.errors import ConfigError
from grass_dist.gradients.capture import LinearCapture, resolve_layers
from grass_dist.gradients.computer import GradientComputer
from grass_dist.runtime.seeding import derive_seed, generator
from grass_dist.tasks.classifier import ClassificationTask
from tests.helpers import SeqModel, layer_grad, mlp, per_sample_grads
from tests.test_no_weight_gemm import MatmulLog, weight_gradient_gemms


def _phi(model, x, y, cfg):
    comps = build_compressors(cfg, resolve_layers(model, None))
    return GradientComputer(model, ClassificationTask(), comps).phi_batch([x, y]), comps


@pytest.mark.parametrize("three_d", [False, True])
def test_identity_equals_torch_func_per_sample_gradients(three_d):
    torch.manual_seed(1)
    model = SeqModel() if three_d else mlp()
    x = torch.randn(6, 4, 5) if three_d else torch.randn(6, 6)
    y = torch.randint(0, 3, (6,))
    phi, _ = _phi(model, x, y, CompressionConfig(method="identity"))
    exact = per_sample_grads(model, x, y)
    for layer, got in phi.items():
        want = layer_grad(exact, layer).reshape(6, -1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sjlt_apply_equals_explicit_matrix():
    s = SJLT(50, 8, generator(0, "t"), c=3)
    x = torch.randn(4, 50)
    torch.testing.assert_close(s.apply(x), x @ s.matrix(), rtol=1e-5, atol=1e-5)


def test_capture_runs_no_weight_gradient_gemm():
    model = mlp(d_in=9, hidden=11)  # weights (11, 9) and (4, 11); a batch of 5 rows
    cap = LinearCapture(model, ["fc1", "out"])
    with MatmulLog() as log:
        with cap.recording():
            loss = ClassificationTask().per_sample_loss(model, [torch.randn(5, 9), torch.zeros(5)])
        cap.factors(loss)
    assert log.calls and weight_gradient_gemms(log, model) == []


@pytest.mark.parametrize("three_d", [False, True])
def test_factgrass_equals_masked_gradient_times_sjlt(three_d):
    torch.manual_seed(2)
    model = SeqModel(d_in=9, hidden=11) if three_d else mlp(d_in=9, hidden=11)
    x = torch.randn(5, 3, 9) if three_d else torch.randn(5, 9)
    y = torch.randint(0, 3, (5,))
    cfg = CompressionConfig(method="factgrass", k=6, blowup=4, seed=7)
    phi, comps = _phi(model, x, y, cfg)
    exact = per_sample_grads(model, x, y)
    for layer, comp in comps.items():
        g = layer_grad(exact, layer)
        masked = g[:, comp.idx_out][:, :, comp.idx_in].reshape(5, -1)
        torch.testing.assert_close(phi[layer], masked @ comp.sjlt.matrix(), rtol=1e-4, atol=1e-5)


def test_factgrass_mask_includes_bias_column_when_drawn():
    # With the full input side kept, the bias column (index d_in) must be in the mask.
    model = mlp(d_in=3, hidden=4)
    comps = build_compressors(
        CompressionConfig(k=4, mask_in=4, mask_out=2), resolve_layers(model, ["fc1"])
    )
    assert comps["fc1"].idx_in.tolist() == [0, 1, 2, 3]


def test_sjlt_inner_products_track_exact_ones():
    # For c = 1, E<Sx,Sy> = <x,y> and Var <= 2 |x|^2 |y|^2 / k, so by Chebyshev each seed
    # misses the 0.25 relative band with p <= 2 / (k * 0.25^2) = 1/32 at k = 1024.
    # Allowing 5 misses out of 20 independent seeds fails with P <= C(20,6) p^6 < 4e-5.
    torch.manual_seed(3)
    x, y = torch.randn(2, 8192)
    y = 0.6 * x + 0.8 * y
    misses = 0
    for seed in range(20):
        s = SJLT(8192, 1024, generator(seed, "jl"))
        sx, sy = s.apply(torch.stack([x, y]))
        err = abs(float(sx @ sy - x @ y)) / float(x.norm() * y.norm())
        misses += err > 0.25
    assert misses <= 5
    assert math.comb(20, 6) * (1 / 32) ** 6 < 4e-5


def test_phi_is_independent_of_batch_size():
    torch.manual_seed(4)
    model = mlp(d_in=9, hidden=11)
    x, y = torch.randn(13, 9), torch.randint(0, 4, (13,))
    dataset = list(zip(x, y, strict=True))
    comps = build_compressors(CompressionConfig(k=8), resolve_layers(model, None))
    comp = GradientComputer(model, ClassificationTask(), comps)
    a = comp.phi_rows(dataset, range(13), batch_size=13)
    b = comp.phi_rows(dataset, range(13), batch_size=4)
    for layer in a.phi:
        torch.testing.assert_close(
            torch.from_numpy(a.phi[layer]), torch.from_numpy(b.phi[layer]), rtol=1e-5, atol=1e-6
        )


def test_compressors_are_reproducible_from_seed_and_name_only():
    model = mlp(d_in=9, hidden=11)
    cfg = CompressionConfig(k=8, seed=5)
    a = build_compressors(cfg, resolve_layers(model, None))
    b = build_compressors(cfg, resolve_layers(mlp(d_in=9, hidden=11, seed=9), ["out", "fc1"]))
    for name in a:
        assert torch.equal(a[name].idx_out, b[name].idx_out)
        assert torch.equal(a[name].idx_in, b[name].idx_in)
        assert torch.equal(a[name].sjlt.buckets, b[name].sjlt.buckets)
    assert derive_seed(0, "fc1", "sjlt") != derive_seed(0, "out", "sjlt")


def test_random_mask_and_factor_sizes():
    idx = random_mask(100, 10, generator(0, "m"))
    assert idx.tolist() == sorted(set(idx.tolist())) and len(idx) == 10
    assert random_mask(5, 10, generator(0, "m")).tolist() == list(range(5))
    assert factor_sizes(16384, 4096, 4097) == (128, 128)
    for kp, d_out, cols in itertools.product([4, 30, 1000], [3, 64], [2, 65]):
        ko, ki = factor_sizes(kp, d_out, cols)
        assert ko <= d_out and ki <= cols
        assert ko * ki >= min(kp, d_out * cols)


def test_k_larger_than_layer_is_refused():
    with pytest.raises(ConfigError, match=r"compression.k=100 is larger than layer 'out'"):
        build_compressors(
            CompressionConfig(k=100, whole_small_layers=False), resolve_layers(mlp(), ["out"])
        )


def test_unknown_and_non_linear_layers_are_refused():
    with pytest.raises(ConfigError, match="'fc9', which is not a module"):
        resolve_layers(mlp(), ["fc9"])
    with pytest.raises(ConfigError, match="'act', a ReLU"):
        resolve_layers(mlp(), ["act"])
