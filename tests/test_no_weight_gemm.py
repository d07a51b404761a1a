"""The capture never runs a weight-gradient GEMM (capture.py's claim), checked on the ops.

A TorchDispatchMode records the output shape of every matrix multiply that runs during one
GradientComputer batch, forward and backward. A Linear layer's weight gradient is a
(d_out, d_in) GEMM output (autograd computes the transposed (d_in, d_out) one for addmm);
with all dimensions distinct and the batch (or batch x time) size apart from them, no
other multiply has either shape. A capture that also differentiated with respect to the
weights would run those GEMMs and leave `p.grad` None all the same, which is why the
check looks at the ops; the last test shows it catches exactly that.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from grass_dist.compress import build_compressors
from grass_dist.config import CompressionConfig
from grass_dist.gradients import dnn_linear
from grass_dist.gradients.capture import resolve_layers
from grass_dist.gradients.computer import GradientComputer
from grass_dist.tasks.classifier import ClassificationTask
from tests.helpers import SeqModel, mlp

aten = torch.ops.aten
MATMULS = {
    aten.mm,
    aten.addmm,
    aten._addmm_activation,
    aten.bmm,
    aten.baddbmm,
    aten.addbmm,
    aten.mv,
    aten.addmv,
    aten.dot,
    aten.matmul,
    aten.linear,
    aten.einsum,
    torch.ops.mkldnn._linear_pointwise,  # Linear layers' products inside the capture
}


class MatmulLog(TorchDispatchMode):
    """Records (op name, output shape) of every matrix multiply dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in MATMULS:
            self.calls.append((func.overloadpacket.__name__, tuple(out.shape)))
        return out


def weight_gradient_gemms(log: MatmulLog, model: nn.Module) -> list[tuple[str, tuple, str]]:
    """The recorded multiplies whose output has a Linear weight's shape, either way round.

    Leading size-1 dims are dropped (a bmm over a batch of one is a plain GEMM); a batched
    (B, d_out, d_in) output with B > 1 is a per-sample gradient, which compressors form.
    """
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            d_out, d_in = module.weight.shape
            shapes[(d_out, d_in)] = shapes[(d_in, d_out)] = name
    found = []
    for op, shape in log.calls:
        while len(shape) > 2 and shape[0] == 1:
            shape = shape[1:]
        if shape in shapes:
            found.append((op, shape, shapes[shape]))
    return found


def _case(model_kind: str):
    """A model with distinct dimensions and a batch whose row count differs from all of them."""
    torch.manual_seed(0)
    if model_kind == "mlp":  # weights (11, 9), (4, 11); batch 5
        return mlp(d_in=9, hidden=11, classes=4), torch.randn(5, 9)
    if model_kind == "wide":  # weights (129, 9), (131, 129), (4, 131); the middle one's
        # products (forward, and its input's gradient) go through oneDNN; batch 5
        layers = [nn.Linear(9, 129), nn.ReLU(), nn.Linear(129, 131), nn.ReLU(), nn.Linear(131, 4)]
        return nn.Sequential(*layers), torch.randn(5, 9)
    # SeqModel: weights (11, 9), (11, 11), (3, 11); (B, T) = (5, 4), so B * T = 20 rows
    return SeqModel(d_in=9, hidden=11), torch.randn(5, 4, 9)


def _index_batch(model: nn.Module, x: torch.Tensor, method: str) -> MatmulLog:
    comps = build_compressors(
        CompressionConfig(method=method, k=6, blowup=2, seed=1), resolve_layers(model, None)
    )
    computer = GradientComputer(model, ClassificationTask(), comps)
    batch = [x, torch.randint(0, 3, (x.shape[0],))]
    dnn_linear.available()  # its check at first use is no product of the batch
    with MatmulLog() as log:
        computer.phi_batch(batch)
    return log


@pytest.mark.parametrize("method", ["factgrass", "identity"])
@pytest.mark.parametrize("model_kind", ["mlp", "seq", "wide"])
def test_an_index_batch_runs_no_weight_gradient_gemm(model_kind, method):
    model, x = _case(model_kind)
    log = _index_batch(model, x, method)
    assert log.calls, "no matrix multiply was recorded: the check would be vacuous"
    assert weight_gradient_gemms(log, model) == []
    routed = [shape for op, shape in log.calls if op == "_linear_pointwise"]
    if model_kind == "wide" and dnn_linear.available():
        assert routed == [(5, 131), (5, 129)]  # its forward, then its input's gradient
    else:
        assert routed == []


@pytest.mark.parametrize("model_kind", ["mlp", "seq"])
def test_the_check_catches_a_capture_that_differentiates_the_weights(model_kind, monkeypatch):
    model, x = _case(model_kind)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    real_grad = torch.autograd.grad

    def grad_with_weights(outputs, inputs, *args, **kwargs):
        # The regression: outputs *and* weights as targets; the weights' grads are dropped.
        inputs = list(inputs)
        return real_grad(outputs, [*inputs, *weights], *args, **kwargs)[: len(inputs)]

    monkeypatch.setattr(torch.autograd, "grad", grad_with_weights)
    log = _index_batch(model, x, "factgrass")
    found = weight_gradient_gemms(log, model)
    assert {layer for _, _, layer in found} == {
        n for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    assert all(p.grad is None for p in model.parameters())  # what the old check looked at
