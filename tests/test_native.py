"""The capture's C loops (gradients/native.py: GPT-2's tanh GELU, the fused head's softmax
numerators) against PyTorch's kernels and float64 references; where they apply, and what
happens where they cannot build."""

from __future__ import annotations

import contextlib
import logging
import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from grass_dist.gradients import computer as computer_module
from grass_dist.gradients import native
from grass_dist.gradients.native import exp_rows_, gelu_tanh
from grass_dist.tasks import lm_head
from tests import test_fast_paths
from tests.helpers import torch_threads
from tests.test_fast_paths import _computer
from tests.test_lm import make_items, rel_err, tiny_lm

BUILDS_HERE = (
    platform.system() == "Linux"
    and platform.machine() == "x86_64"
    and shutil.which("cc") is not None
)
needs_kernel = pytest.mark.skipif(not BUILDS_HERE, reason="needs x86-64 Linux with a C compiler")


def fresh(monkeypatch, tmp_path, **env):
    """The module as in a new process, caching under tmp_path, with `env` set."""
    monkeypatch.setattr(native, "_library", [])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def path_of(y: torch.Tensor) -> str:
    return type(y.grad_fn).__name__


@needs_kernel
def test_it_builds_here_and_its_library_is_cached(monkeypatch, tmp_path):
    fresh(monkeypatch, tmp_path)
    assert native.available()
    built = list((tmp_path / "grass_dist" / "native").glob("loops-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_library", [])
    assert native.available()
    assert built[0].stat().st_mtime_ns == stamp  # the second process loads, not rebuilds


@needs_kernel
@pytest.mark.parametrize("scale", [0.5, 3.0, 30.0])
def test_values_and_gradients_are_pytorchs_to_float_rounding(scale):
    torch.manual_seed(0)
    x = (torch.randn(3, 64, 1024) * scale).requires_grad_()
    g = torch.randn(3, 64, 1024)
    with torch_threads(1):
        y = gelu_tanh(x)
    assert path_of(y) == "_GeluTanhBackward"
    (grad,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double().requires_grad_()
    y64 = F.gelu(x64, approximate="tanh")
    (grad64,) = torch.autograd.grad(y64, x64, g.double())
    ours_y, ours_g = (y.double() - y64).abs().max(), (grad.double() - grad64).abs().max()
    theirs = F.gelu(x.detach(), approximate="tanh")
    theirs_g = torch.ops.aten.gelu_backward(g, x.detach(), approximate="tanh")
    their_y, their_g = (theirs.double() - y64).abs().max(), (theirs_g.double() - grad64).abs().max()
    # no further from float64 than PyTorch's own float32 kernel, give or take a rounding
    assert ours_y <= 2 * their_y + 1e-7 * scale
    assert ours_g <= 4 * their_g + 1e-6
    torch.testing.assert_close(y, theirs, rtol=2e-6, atol=2e-6 * scale)


@needs_kernel
def test_it_is_pytorchs_kernel_wherever_the_loop_does_not_apply():
    x = torch.randn(2, 64, 256)
    with torch_threads(1):
        assert path_of(gelu_tanh(x.clone().requires_grad_())) == "_GeluTanhBackward"
        for other in (
            x.double(),  # not float32
            x.transpose(1, 2),  # not contiguous
            x[:1, :4],  # too few elements for the call to pay
        ):
            y = gelu_tanh(other.clone().requires_grad_() if other.is_contiguous() else other)
            assert torch.equal(y, F.gelu(other, approximate="tanh"))
    with torch_threads(2):  # the loop is one thread; PyTorch's kernel splits across more
        y = gelu_tanh(x.requires_grad_())
        assert path_of(y) == "GeluBackward0"
        assert torch.equal(y, F.gelu(x, approximate="tanh"))


@needs_kernel
def test_loading_it_leaves_denormals_alone():
    """Linking with -ffast-math would make this process flush denormals to zero."""
    assert native.available()
    assert 5e-324 * 1.0 == 5e-324
    assert (torch.tensor([1e-40]) * 2).item() != 0.0


@needs_kernel
def test_a_second_derivative_is_refused():
    x = torch.randn(4096, requires_grad=True)
    with torch_threads(1):
        y = gelu_tanh(x)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@needs_kernel
def test_pytorch_kernels_switches_the_loops_off_for_its_block_only():
    x = torch.randn(2, 64, 256, requires_grad=True)
    with torch_threads(1):
        with native.pytorch_kernels():
            assert path_of(gelu_tanh(x)) == "GeluBackward0"
        assert path_of(gelu_tanh(x)) == "_GeluTanhBackward"


@needs_kernel
def test_a_cache_it_cannot_write_in_builds_in_the_temporary_folder(monkeypatch, tmp_path):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")  # $XDG_CACHE_HOME is a file: no folder can be made in it
    fresh(monkeypatch, not_a_folder)
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path / "tmp"))
    assert native.available()
    assert len(list((tmp_path / "tmp").rglob("loops-*.so"))) == 1


def test_switched_off_by_the_environment(monkeypatch, tmp_path):
    fresh(monkeypatch, tmp_path, GRASS_DIST_NATIVE="0")
    assert not native.available()
    x = torch.randn(2, 64, 256, requires_grad=True)
    with torch_threads(1):
        assert path_of(gelu_tanh(x)) == "GeluBackward0"


def test_a_compiler_that_fails_leaves_pytorchs_kernel(monkeypatch, tmp_path, caplog):
    broken = tmp_path / "cc"
    broken.write_text(
        "#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'cc: no such flag' >&2\nexit 1\n"
    )
    broken.chmod(0o755)
    fresh(monkeypatch, tmp_path, CC=str(broken))
    with caplog.at_level(logging.INFO, logger=native.__name__):
        assert not native.available()
    if BUILDS_HERE:
        assert "did not build (cc: no such flag)" in caplog.text
    assert not list(tmp_path.rglob("*.so"))
    x = torch.randn(2, 64, 256)
    with torch_threads(1):
        assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))


@needs_kernel
def test_a_gpt2s_phi_on_one_thread_changes_by_float_rounding_only(monkeypatch):
    """On one thread the capture's fast path runs GPT-2's GELU as the C loop."""
    items = make_items([40, 33, 28, 40, 17, 36])  # batches of 2 x 40 x 256 GELU inputs
    calls = []
    original = native._GeluTanh.apply
    monkeypatch.setattr(native._GeluTanh, "apply", lambda *a: calls.append(1) or original(*a))
    with torch_threads(1):
        fast = _computer(tiny_lm("gpt2")).phi_rows(items, range(6), batch_size=2)
    assert calls
    monkeypatch.setattr(
        computer_module, "activation_gradients", lambda _m: contextlib.nullcontext()
    )
    with torch_threads(1):
        usual = _computer(tiny_lm("gpt2")).phi_rows(items, range(6), batch_size=2)
    for name, phi in usual.phi.items():
        assert rel_err(torch.from_numpy(fast.phi[name]), torch.from_numpy(phi)) < 1e-6, name


def torch_exp_rows(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    top = z.amax(1, keepdim=True)
    e = (z - top).exp()
    return e, top, e.sum(1, keepdim=True)


@needs_kernel
def test_exp_rows_is_pytorchs_softmax_numerators_to_float_rounding(monkeypatch):
    torch.manual_seed(0)
    z = torch.randn(70, 8192) * 12
    z[3] = -1e30  # a row with nothing near its max but itself is still a row
    want, want_top, want_total = torch_exp_rows(z)
    assert native.available()
    calls = []
    monkeypatch.setattr(native, "_loaded", lambda: calls.append(1) or native._library[0])
    got = z.clone()
    with torch_threads(1):
        top, total = exp_rows_(got)
    assert calls
    assert torch.equal(top, want_top)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-30)
    torch.testing.assert_close(total, want_total, rtol=2e-6, atol=0)


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_exp_rows_leaves_a_non_finite_logit_non_finite(bad):
    """A NaN or inf logit must make its row's loss non-finite, as PyTorch's ops do: the job
    refuses non-finite losses and gradients by name."""
    z = torch.randn(8, 4096)
    z[2, 100] = bad
    _, _, want = torch_exp_rows(z)
    with torch_threads(1):
        _, total = exp_rows_(z)
    assert not torch.isfinite(want[2]) and not torch.isfinite(total[2])
    assert torch.isfinite(total[[0, 1, 3]]).all()


@needs_kernel
@pytest.mark.parametrize("confidence", [0.0, 5.0, 10.0])
def test_the_fused_heads_float32_error_on_one_thread(confidence, monkeypatch):
    """The fused head's float32 test (test_fast_paths), on one thread: through the C loop."""
    calls = []
    original = native.exp_rows_
    monkeypatch.setattr(lm_head, "exp_rows_", lambda z: calls.append(z.shape) or original(z))
    monkeypatch.setattr(native, "MIN_ELEMENTS", 1)
    with torch_threads(1):
        test_fast_paths.test_the_fused_gradients_float32_error_is_the_usual_paths(confidence)
    assert calls
