"""Same answer on a GPU: phi computed on CUDA equals phi computed on the CPU.

Every mask and sketch is drawn on a CPU generator and moved to the device, so only float
summation order may differ between devices. Skipped where there is no CUDA device.
"""

import copy

import pytest
import torch

from grass_dist.compress import build_compressors
from grass_dist.config import CompressionConfig
from grass_dist.gradients.capture import resolve_layers
from grass_dist.gradients.computer import GradientComputer
from grass_dist.tasks.classifier import ClassificationTask
from tests.helpers import SeqModel, mlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

METHODS = {
    "factgrass": {"k": 16},
    "logra": {"k": 16, "proj_out": 4, "proj_in": 4},
    "grass": {"k": 16},
    "sjlt": {"k": 16},
    "random_mask": {"k": 16},
    "gaussian": {"k": 16},
    "rademacher": {"k": 16},
    "identity": {},
}


def phi_on(device: str, model, batch, cfg: CompressionConfig) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)  # GradientComputer moves the model it is given
    comps = build_compressors(cfg, resolve_layers(model, None))
    computer = GradientComputer(model, ClassificationTask(), comps, device)
    return {n: p.cpu() for n, p in computer.phi_batch(batch).items()}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("three_d", [False, True])
def test_phi_on_cuda_equals_phi_on_cpu(method, three_d):
    gen = torch.Generator().manual_seed(3)
    if three_d:
        model, x = SeqModel(d_in=12, hidden=20, classes=5), torch.randn(8, 6, 12, generator=gen)
    else:
        model, x = mlp(d_in=24, hidden=32), torch.randn(8, 24, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    cfg = CompressionConfig(method=method, **METHODS[method])
    cpu = phi_on("cpu", model, [x, y], cfg)
    cuda = phi_on("cuda", model, [x, y], cfg)
    assert cpu.keys() == cuda.keys()
    for name in cpu:
        torch.testing.assert_close(cuda[name], cpu[name], rtol=1e-4, atol=1e-5)


def test_bf16_model_on_cuda_gives_finite_float32_phi():
    model = mlp(d_in=24, hidden=32).to(torch.bfloat16)
    x = torch.randn(8, 24, dtype=torch.bfloat16)
    y = torch.randint(0, 3, (8,))
    phi = phi_on("cuda", model, [x, y], CompressionConfig(method="factgrass", k=16))
    for p in phi.values():
        assert p.dtype == torch.float32 and p.shape == (8, 16)
        assert bool(torch.isfinite(p).all()) and float(p.abs().sum()) > 0
