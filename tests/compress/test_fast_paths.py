"""The optimised FactGraSS / SJLT paths against explicit definitions, and batch-size
independence: every mask case (full, with and without the bias column), one position and
sequences, several SJLT copies."""

import pytest
import torch
from torch import nn

from grass_dist.compress import (
    FactGraSSCompressor,
    LinearShape,
    build_compressor,
    build_compressors,
    linear,
)
from grass_dist.compress.sketch import SJLT, scatter_signed
from grass_dist.config import CompressionConfig
from grass_dist.errors import BadRowsError, NonFiniteGradientError, NonFiniteLossError
from grass_dist.gradients.capture import resolve_layers
from grass_dist.gradients.computer import GradientComputer, all_finite
from grass_dist.runtime.seeding import generator
from grass_dist.tasks.classifier import ClassificationTask


def _explicit_g(x: torch.Tensor, g: torch.Tensor, bias: bool) -> torch.Tensor:
    """G = sum_t g_t a_t^T with a = [x, 1]: (B, d_out, cols), in float64."""
    a = torch.cat([x, torch.ones_like(x[..., :1])], -1) if bias else x
    return torch.einsum("bto,bti->boi", g.double(), a.double())


def _factors(t: int, d_in: int = 7, d_out: int = 6, batch: int = 9):
    gen = torch.Generator().manual_seed(t)
    return torch.randn(batch, t, d_in, generator=gen), torch.randn(batch, t, d_out, generator=gen)


@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize(
    "bias,mask_out,mask_in,want_bias_col",
    [
        (True, 6, 8, True),  # full masks: no gather at all, bias column kept
        (True, 4, 5, True),  # partial masks with the bias column (seed chosen below)
        (True, 4, 5, False),  # partial masks without it
        (False, 3, 4, False),
    ],
)
@pytest.mark.parametrize("sjlt_c", [1, 3])
def test_factgrass_is_masked_g_times_sjlt(t, bias, mask_out, mask_in, want_bias_col, sjlt_c):
    shape = LinearShape(7, 6, bias)
    comp = next(
        c
        for seed in range(100)
        if (
            c := FactGraSSCompressor(
                "l", shape, 10, seed, mask_out=mask_out, mask_in=mask_in, sjlt_c=sjlt_c
            )
        )._bias
        == want_bias_col
    )
    x, g = _factors(t)
    big_g = _explicit_g(x, g, bias)[:, comp.idx_out][:, :, comp.idx_in].reshape(9, -1)
    want = big_g @ comp.sjlt.matrix().double()
    torch.testing.assert_close(comp.compress(x, g).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 6])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "method", ["factgrass", "grass", "sjlt", "random_mask", "identity", "logra"]
)
def test_phi_is_bit_for_bit_independent_of_the_batch_split(t, bias, method):
    # LoGra's projections are matrix products over all positions of the batch: BLAS may
    # block them by batch size, so they are only equal to rounding for one position.
    shape = LinearShape(40, 30, bias)
    comp = build_compressor(CompressionConfig(method=method, k=64), "layer", shape)
    x, g = _factors(t, 40, 30, batch=11)
    whole = comp.compress(x, g)
    split = torch.cat([comp.compress(x[i : i + 4], g[i : i + 4]) for i in range(0, 11, 4)])
    if method == "logra" and t == 1:
        torch.testing.assert_close(whole, split)
    else:
        assert torch.equal(whole, split)


def test_compress_leaves_its_inputs_alone():
    comp = FactGraSSCompressor("l", LinearShape(7, 6, True), 10, 0, mask_out=6, mask_in=8)
    for t in (1, 4):
        x, g = _factors(t, batch=1)
        before = (x.clone(), g.clone())
        comp.compress(x, g)
        assert torch.equal(x, before[0]) and torch.equal(g, before[1])


def test_scatter_signed_sums_every_copy_in_place_or_not():
    s = SJLT(30, 7, generator(0, "s"), c=2)
    x = torch.randn(5, 30)
    want = x @ s.matrix()
    out = torch.zeros(5, 7)
    scatter_signed(out, x.clone(), s.buckets, s.signs, overwrite=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(s.apply(x), want)


@pytest.mark.parametrize("t", [1, 3])
def test_factgrass_in_sample_chunks_equals_one_chunk(t, monkeypatch):
    comp = FactGraSSCompressor("l", LinearShape(7, 6, True), 10, 0, mask_out=4, mask_in=5)
    x, g = _factors(t, batch=9)
    whole = comp.compress(x, g)
    monkeypatch.setattr(linear, "_CHUNK_FLOATS", 2 * 4 * 5)  # chunks of two samples
    assert torch.equal(comp.compress(x, g), whole)


def test_all_finite_is_exact_even_when_the_sum_overflows():
    assert all_finite(torch.tensor([[3e38, 3e38], [1.0, 2.0]]))
    assert not all_finite(torch.tensor([[1.0, float("nan")]]))
    assert not all_finite(torch.tensor([[float("inf"), 1.0]]))
    assert not all_finite(torch.tensor([[float("inf"), -float("inf")]]))


class _SqrtOfFc1(nn.Module):
    """sqrt(|fc1(x)|) with no bias: a zero input has a finite loss but a NaN gradient."""

    def __init__(self):
        super().__init__()
        self.fc1, self.out = nn.Linear(4, 5, bias=False), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.fc1(x).abs().sqrt())


def test_non_finite_phi_names_the_layer_and_rows():
    model = _SqrtOfFc1()
    comps = build_compressors(CompressionConfig(k=4), resolve_layers(model, None))
    rows = [(torch.randn(4), torch.tensor(1)) for _ in range(3)]
    rows[2] = (torch.zeros(4), torch.tensor(0))
    with pytest.raises(NonFiniteGradientError, match=r"layer 'fc1' for rows 2..2"):
        GradientComputer(model, ClassificationTask(), comps).phi_rows(rows, range(3), 2)
    rows[2] = (torch.tensor([1.0, float("nan"), 0.0, 0.0]), torch.tensor(0))  # a NaN loss
    with pytest.raises(NonFiniteLossError, match=r"rows \[2\] \(1 of a batch of 1\)"):
        GradientComputer(model, ClassificationTask(), comps).phi_rows(rows, range(3), 2)


class _NanForSome(nn.Module):
    """Outputs NaN for the rows whose first input is above 0.5: their loss is NaN, but
    torch.where passes no gradient to that branch, so their gradients are all zero."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.out = nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)

    def forward(self, x):
        y = self.out(self.norm(self.fc1(x)))
        return torch.where(x[:, :1] > 0.5, torch.full_like(y, float("nan")), y)


@pytest.mark.parametrize("layers", [["fc1", "out"], ["norm"]])  # capture hooks; torch.func
def test_rows_with_a_non_finite_loss_are_named_though_their_gradients_are_zero(layers):
    model = _NanForSome()
    comps = build_compressors(CompressionConfig(k=4), resolve_layers(model, layers))
    rows = [(torch.tensor([v, 0.1, 0.2, 0.3]), torch.tensor(1)) for v in (0, 0.9, 0.1, 0.8, 0.2)]
    computer = GradientComputer(model, ClassificationTask(), comps)
    with pytest.raises(NonFiniteLossError, match=r"rows \[1, 3\] \(2 of a batch of 5\)") as e:
        computer.phi_rows(rows, range(5), 5)
    assert e.value.positions == [1, 3]
    ok = [rows[i] for i in (0, 2, 4)]
    assert all(
        all_finite(torch.from_numpy(p)) for p in computer.phi_rows(ok, range(3), 3).phi.values()
    )


def test_a_row_the_task_or_model_cannot_take_is_refused_naming_it():
    model = _SqrtOfFc1()  # 4 inputs, 3 classes
    comps = build_compressors(CompressionConfig(k=4), resolve_layers(model, None))
    computer = GradientComputer(model, ClassificationTask(), comps)
    rows = [(torch.rand(4) + 0.1, torch.tensor(1)) for _ in range(6)]
    rows[4] = (torch.rand(4) + 0.1, torch.tensor(12))  # a label outside the model's classes
    said = r"could not compute the loss of rows \[4\] \(1 of a batch of 3, each failing on its"
    said += r" own\)"
    with pytest.raises(BadRowsError, match=said + r": IndexError: Target 12 is out of bounds"):
        computer.phi_rows(rows, range(6), 3)
    rows[3] = rows[5] = rows[4]  # every row of the batch fails: the batch is named
    said = r"could not compute the loss of rows 3\.\.5 \(a batch of 3; its entry i is row 3\+i\)"
    with pytest.raises(BadRowsError, match=said + r": IndexError: Target 12 is out of bounds"):
        computer.phi_rows(rows, range(6), 3)
    rows[3] = rows[5] = (torch.rand(4) + 0.1, torch.tensor(1))
    rows[4] = (torch.rand(2) + 0.1, torch.tensor(1))  # fewer features than row 0
    with pytest.raises(BadRowsError, match=r"could not collate rows 3\.\.5 .*RuntimeError: stack"):
        computer.phi_rows(rows, range(6), 3)
