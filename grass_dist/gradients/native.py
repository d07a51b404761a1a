"""Two elementwise loops of the capture's one-thread CPU batches, in C.

PyTorch's CPU kernel for GPT-2's GELU, `F.gelu(x, approximate="tanh")`, costs about five
times `torch.tanh` at one thread, each way; the fused LM head's softmax numerators (the rows'
max, exp(z - max) in place, the rows' sums) take four passes over the (rows, vocabulary)
logits. On an index batch of a GPT-2 of width 256 and vocabulary 8192 the two cost about 16
of 140 ms at one thread. Here each is one loop:

- `gelu_tanh`: the forward computes, in one pass over x, both y = gelu(x) and its derivative
  d = y'(x) from the one tanh, and the backward is the product g * d (PyTorch's kernel
  recomputes the tanh in its backward).
- `exp_rows_`: per row, the max, then exp(z - max) written in place while summing.

The loops are compiled on first use by the machine's C compiler (`cc`) for this CPU
(`-march=native`; their tanh and exp are glibc's vectorised ones, which need `-ffast-math`
where the object is compiled, never where it is linked: linking with it would switch this
process's float units to flush denormals to zero), and cached by source, flags, compiler and
CPU under `$XDG_CACHE_HOME/grass_dist/native` (or ~/.cache/...).

Each equals its PyTorch form to float rounding. A loop runs only on a float32, contiguous CPU
tensor on one torch thread (a CPU lane: the loops are one thread, and PyTorch's kernels split
across more), and only on x86-64 Linux with a C compiler; anywhere else, and with
GRASS_DIST_NATIVE=0 in the environment, the PyTorch form runs. `gelu_tanh`'s backward
refuses to build a graph (create_graph=True): the capture's `autograd.grad` asks for first
derivatives only.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = r"""
#include <math.h>
#include <stddef.h>

/* y = x/2 (1 + t), t = tanh(c (x + a x^3));
   d = dy/dx = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 a x^2) */
void gelu_tanh_forward(const float *restrict x, float *restrict y, float *restrict d,
                       ptrdiff_t n) {
    const float c = 0.7978845608028654f, a = 0.044715f;
    for (ptrdiff_t i = 0; i < n; i++) {
        float v = x[i], v2 = v * v;
        float t = tanhf(c * (v + a * v2 * v));
        float h = 0.5f * (1.0f + t);
        y[i] = v * h;
        d[i] = h + 0.5f * v * (1.0f - t * t) * c * (1.0f + 3.0f * a * v2);
    }
}

/* per row r of z (rows x cols): top[r] = max, z = exp(z - top[r]) in place, total[r] = sum */
void exp_rows(float *restrict z, float *restrict top, float *restrict total, ptrdiff_t rows,
              ptrdiff_t cols) {
    for (ptrdiff_t r = 0; r < rows; r++) {
        float *row = z + r * cols, most = -INFINITY, sum = 0.0f;
        for (ptrdiff_t i = 0; i < cols; i++)
            most = row[i] > most ? row[i] : most;
        for (ptrdiff_t i = 0; i < cols; i++) {
            float e = expf(row[i] - most);
            row[i] = e;
            sum += e;
        }
        top[r] = most;
        total[r] = sum;
    }
}
"""
COMPILE = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fPIC"]
LINK = ["-shared", "-lm"]  # no -ffast-math here (see above)
MIN_ELEMENTS = 4096  # below this a call's overhead outweighs the kernel's gain

_lock = threading.Lock()
_library: list = []  # [] not tried yet, [None] unavailable, [the loaded library]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")`, by the C loop where it applies (see the module)."""
    if _applies(x) and (library := _loaded()) is not None:
        return _GeluTanh.apply(x, library.gelu_tanh_forward)
    return F.gelu(x, approximate="tanh")


def exp_rows_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a (rows, cols) z: its rows' max (rows, 1), with z set in place to exp(z - max),
    and the rows' sums of that (rows, 1); by the C loop where it applies (see the module)."""
    if z.dim() == 2 and _applies(z) and (library := _loaded()) is not None:
        top, total = z.new_empty(z.shape[0], 1), z.new_empty(z.shape[0], 1)
        library.exp_rows(z.data_ptr(), top.data_ptr(), total.data_ptr(), *z.shape)
        return top, total
    top = z.amax(1, keepdim=True)
    return top, z.sub_(top).exp_().sum(1, keepdim=True)


def _applies(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.is_contiguous()
        and x.numel() >= MIN_ELEMENTS
        and torch.get_num_threads() == 1
    )


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel):
        y, d = torch.empty_like(x), torch.empty_like(x)
        kernel(x.data_ptr(), y.data_ptr(), d.data_ptr(), x.numel())  # ctypes drops the GIL
        ctx.save_for_backward(d)
        return y

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: its graph would miss d's own slope
            raise RuntimeError(
                "the capture's native tanh GELU has first derivatives only, and a graph of "
                "its gradient was asked for (create_graph=True)"
            )
        (d,) = ctx.saved_tensors
        return grad * d, None


@contextmanager
def pytorch_kernels() -> Iterator[None]:
    """Inside the block the PyTorch forms run, on every thread (to compare, as bench/ does)."""
    with _lock:
        kept = list(_library)
        _library[:] = [None]
    try:
        yield
    finally:
        with _lock:
            _library[:] = kept


def available() -> bool:
    """Whether this process has the C loops (compiling them on first call)."""
    return _loaded() is not None


def _loaded() -> ctypes.CDLL | None:
    with _lock:
        if not _library:
            _library.append(_load())
        return _library[0]


def _load() -> ctypes.CDLL | None:
    """The compiled loops, or None (logged) where there are none."""
    if os.environ.get("GRASS_DIST_NATIVE", "1") == "0":
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.debug("no C compiler: the capture's elementwise loops run as PyTorch's kernels")
        return None
    try:  # RuntimeError: no home folder to cache in
        library = ctypes.CDLL(str(_built(compiler)))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        log.info("the native loops did not build (%s): PyTorch's kernels run instead", _first(e))
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_ssize_t
    library.gelu_tanh_forward.argtypes = [pointer, pointer, pointer, size]
    library.exp_rows.argtypes = [pointer, pointer, pointer, size, size]
    for fn in (library.gelu_tanh_forward, library.exp_rows):
        fn.restype = None
    return library


def _built(compiler: str) -> Path:
    """The shared library for this source, flags, compiler and CPU: cached, else built (into
    a temporary name, then renamed into place: processes building at once each get a whole
    file)."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    key = "\0".join([SOURCE, *COMPILE, *LINK, compiler, version, _cpu()])
    name = f"loops-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    for folder in (_cache(), Path(tempfile.gettempdir()) / f"grass_dist-native-{os.getuid()}"):
        target = folder / name
        if target.is_file():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as work:
                _compile(compiler, Path(work))
                os.replace(Path(work) / "lib.so", target)
            return target
        except OSError:  # not a folder it can write in: the next
            if not (target.parent.is_dir() and os.access(target.parent, os.W_OK)):
                continue
            raise
    raise OSError("no writable folder for the compiled kernel")


def _compile(compiler: str, work: Path) -> None:
    (work / "k.c").write_text(SOURCE)
    for args in (
        [*COMPILE, "-c", "k.c", "-o", "k.o"],
        ["k.o", "-o", "lib.so", *LINK],
    ):
        subprocess.run(
            [compiler, *args], cwd=work, capture_output=True, text=True, timeout=120, check=True
        )


def _cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "grass_dist" / "native"


def _cpu() -> str:
    """The CPU's model and feature flags (a library built for one CPU may not run on another)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(wanted)))


def _first(e: BaseException) -> str:
    detail = getattr(e, "stderr", None) or str(e)
    return (detail.strip().splitlines() or [type(e).__name__])[0]
