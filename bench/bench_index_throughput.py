"""Index throughput on CPU: grass_dist and dattri 0.3.0 against plain forward + backward.

    .venv/bin/python bench/bench_index_throughput.py                 # full run (~20 min)
    .venv/bin/python bench/bench_index_throughput.py --models mlp --k 1024 --reps 3

Same model, same k per layer, same batch, one process, competitors interleaved (see
`timing.py`):
- `plain fwd+bwd`: the summed loss's `loss.backward()` with weight gradients, as a training
  step computes them; no capture (the limit an index build is measured against);
- `grass_dist factgrass` / `grass_dist logra`: `GradientComputer.phi_batch`, the code path
  the index workers run (capture, backward to layer outputs, compression);
- `dattri factgrass` / `dattri logra`: `FactGraSSAttributor` / `LoGraAttributor.cache`
  (hessian="Identity", offload="cpu"): dattri's own capture and compression of the same
  batches. On CPU dattri 0.3.0 has no SJLT: FactGraSS's second stage is a dense Gaussian,
  regenerated block by block on every call.
Models: the digits MLP (64-128-64-10; fc1 and fc2 are attributed: `out` has 650 gradient
entries, fewer than k) and a GPT-shaped model (4 blocks, width 512, sequence 128, its 24
block Linear layers attributed). dattri is not a grass_dist dependency: it lives in a
benchmark-only environment (`bench/dattri_env.sh` makes `.venv-dattri`); when this
interpreter lacks dattri and that environment exists, the script re-runs itself there, so
all five competitors share one process. Writes bench/results/throughput.md.
"""

from __future__ import annotations

import os

# dattri draws progress bars; tqdm reads this when torch imports it.
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.models import CausalLMTask, digits_mlp_shape, gpt, linear_names, token_batch  # noqa: E402
from bench.timing import interleaved, machine_note, write_result  # noqa: E402
from grass_dist.compress import build_compressors  # noqa: E402
from grass_dist.config import CompressionConfig  # noqa: E402
from grass_dist.gradients.capture import resolve_layers  # noqa: E402
from grass_dist.gradients.computer import GradientComputer  # noqa: E402
from grass_dist.tasks.classifier import ClassificationTask  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "throughput.md"
NOTES = (
    "Each competitor's first call is an untimed warm-up (for dattri it includes torch.compile "
    "of its compressors). The MLP's attributed layers have only 8320 and 8256 gradient "
    "entries: FactGraSS sketches k' = 4096 of them per layer and sample at k = 1024, whole "
    "layers at k = 4096, which costs more than the MLP's own forward and backward, so ratios "
    "below 1 are expected there; the GPT-shaped rows are the sub-linear regime the method is for."
)
DATTRI_PY = ROOT / ".venv-dattri" / "bin" / "python"


def workload(name: str, batch: int) -> dict:
    """Model, task, layers, one batch (ours) and its dattri twin (items with a leading 1)."""
    if name == "mlp":
        model, task, layers = digits_mlp_shape(), ClassificationTask(), ["fc1", "fc2"]
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(batch, 64, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
        return {
            "model": model,
            "task": task,
            "layers": layers,
            "batch": [x, y],
            "tokens": 1,
            "dattri": (x[:, None], y),
        }
    model, task = gpt(), CausalLMTask()
    inputs, targets = token_batch(batch, 128, 4096)
    return {
        "model": model,
        "task": task,
        "layers": linear_names(model, "blocks"),
        "batch": [inputs, targets],
        "tokens": 128,
        "dattri": (inputs[:, None], targets[:, None]),
    }


def dattri_loss(model, batch, device):
    """dattri's convention: a batch-mean loss (it rescales by the batch size itself)."""
    inputs, targets = batch
    logits = model(inputs.to(device))
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.to(device).flatten())


class Batches(Dataset):
    """Tensors indexed along their first axis; `__getitems__` slices a whole batch at once,
    so dattri's DataLoader costs what our pre-collated batch costs (no per-item collate)."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int) -> tuple:
        return tuple(t[i] for t in self.tensors)

    def __getitems__(self, idx: list[int]) -> tuple:
        return tuple(t[idx] for t in self.tensors)


def dattri_cachers(w: dict, k: int, batches: int, cache_dir: str) -> dict:
    """Callables running dattri's cache() over `batches` copies of the batch."""
    from dattri.algorithm import FactGraSSAttributor, LoGraAttributor
    from dattri.task import AttributionTask

    data = Batches(*(t.repeat(batches, *[1] * (t.dim() - 1)) for t in w["dattri"]))
    loader = DataLoader(data, batch_size=len(w["dattri"][0]), collate_fn=lambda b: b)
    out = {}
    for label, cls, extra in [
        ("dattri factgrass", FactGraSSAttributor, {"blowup_factor": 4}),
        ("dattri logra", LoGraAttributor, {}),
    ]:
        model = copy.deepcopy(w["model"])
        task = AttributionTask(model=model, loss_func=dattri_loss, checkpoints=model.state_dict())
        att = cls(
            task=task,
            layer_names=w["layers"],
            hessian="Identity",
            device="cpu",
            proj_dim=k,
            offload="cpu",
            cache_dir=os.path.join(cache_dir, label),
            **extra,
        )
        out[label] = lambda att=att: att.cache(loader)
    return out


def compressors(method: str, k: int, shapes: dict) -> dict:
    return build_compressors(CompressionConfig(method=method, k=k), shapes)


def competitors(w: dict, k: int, batches: int, use_dattri: bool, cache_dir: str) -> dict:
    model, task, batch = w["model"], w["task"], w["batch"]
    shapes = resolve_layers(model, w["layers"])
    computers = {
        m: GradientComputer(model, task, compressors(m, k, shapes)) for m in ("factgrass", "logra")
    }

    def plain():
        for _ in range(batches):
            model.zero_grad(set_to_none=True)
            task.per_sample_loss(model, batch).sum().backward()

    def ours(m):
        return lambda: [computers[m].phi_batch(batch) for _ in range(batches)]

    fns = {
        "plain fwd+bwd": plain,
        "grass_dist factgrass": ours("factgrass"),
        "grass_dist logra": ours("logra"),
    }
    if use_dattri:
        fns.update(dattri_cachers(w, k, batches, cache_dir))
    return fns


def rows(model_name: str, w: dict, k: int, batch: int, batches: int, timings: dict) -> list[str]:
    base = timings["plain fwd+bwd"]
    fact = timings["grass_dist factgrass"]
    out = []
    for name, t in timings.items():
        n = batch * batches
        tokens = f"{n * w['tokens'] / t.cpu_s:.0f}" if w["tokens"] > 1 else "-"
        out.append(
            f"| {model_name} | {k} | {batch} | {name} | {n / t.cpu_s:.1f} | {tokens} | "
            f"{base.cpu_s / t.cpu_s:.3f} | {t.cpu_s / fact.cpu_s:.2f} | "
            f"{n / t.wall_s:.1f} | {base.wall_s / t.wall_s:.3f} |"
        )
    return out


def dattri_status() -> tuple[bool, str]:
    """(usable, note) for dattri in this interpreter."""
    if importlib.util.find_spec("dattri") is None:
        where = os.path.relpath(sys.executable, ROOT)
        return False, f"dattri not run: not importable from {where} (bench/dattri_env.sh)"
    from importlib.metadata import version

    return True, f"dattri {version('dattri')} from {os.path.relpath(sys.executable, ROOT)}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["mlp", "gpt"], choices=["mlp", "gpt"])
    ap.add_argument("--k", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--mlp-batch", type=int, default=256)
    ap.add_argument("--gpt-batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dattri", choices=["auto", "off"], default="auto")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    use_dattri, note = dattri_status() if args.dattri == "auto" else (False, "dattri off")
    if args.dattri == "auto" and not use_dattri and DATTRI_PY.exists():
        return subprocess.call([str(DATTRI_PY), __file__, *sys.argv[1:]])
    torch.set_num_threads(args.threads)
    command = "python bench/bench_index_throughput.py " + " ".join(sys.argv[1:])
    lines = [
        "# Index throughput on CPU: grass_dist and dattri vs plain forward + backward",
        "",
        f"Command: `{command.strip()}`",
        "",
        machine_note(args.threads),
        "",
        note,
        "",
        "Rows/s from process CPU time (one torch thread: the work done, unaffected by other "
        "load) and from wall time; `x plain` = plain fwd+bwd time / method time (above 1: "
        "faster than a training step, which also computes weight gradients); `x factgrass` = "
        "method time / grass_dist FactGraSS time. dattri on CPU: FactGraSS's second stage is "
        "a dense Gaussian (no CPU SJLT in dattri 0.3.0).",
        "",
        NOTES,
        "",
        "| model | k/layer | batch | method | rows/s (CPU) | tokens/s (CPU) | x plain (CPU) | "
        "x factgrass time | rows/s (wall) | x plain (wall) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as cache_dir:
        for model_name in args.models:
            batch = args.mlp_batch if model_name == "mlp" else args.gpt_batch
            batches = 20 if model_name == "mlp" else 1
            w = workload(model_name, batch)
            for k in args.k:
                fns = competitors(w, k, batches, use_dattri, cache_dir)
                out = rows(model_name, w, k, batch, batches, interleaved(fns, args.reps))
                print("\n".join(out), flush=True)
                lines += out
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
