"""The user-contract suite: a user's own package, outside grass_dist, driven through the CLI.

`user_pkg` writes a small package `my_pkg` into a temporary directory, the way a user
would have it next to their project: a model factory that loads a checkpoint, plain
`TensorDataset` / list-of-tuples / list-of-dicts datasets, a custom task and a retraining
recipe, and a regression beside them (model, float targets, MSE task). Nothing in it
imports grass_dist. `run_job` runs `python -m jobs.<name>` in a subprocess with that
package on PYTHONPATH, exactly as README documents.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_MODELS = '''
"""A user's model: an MLP whose weights come from a checkpoint file."""
from collections import OrderedDict

import torch
from torch import nn


def build(hidden=24, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(64, hidden), act=nn.ReLU(), out=nn.Linear(hidden, 10)))


def load(path, hidden=24):
    model = build(hidden)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def chatty(path, hidden=24):
    """The checkpoint's model, printing as it runs (a user's debugging print)."""
    model = load(path, hidden)
    model.register_forward_hook(lambda m, args, out: print(f"forward of a batch of {len(out)}"))
    return model


def diverged(path, hidden=24):
    """The checkpoint as a run whose loss went NaN would have saved it."""
    model = load(path, hidden)
    with torch.no_grad():
        model.fc1.weight[3, 5] = float("nan")
        model.out.bias[0] = float("inf")
    return model
'''

_DATA = '''
"""A user's data: scikit-learn's digits as plain datasets (no keys, no describe)."""
import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

N_TRAIN_MAX = 1000


def _digits():
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    return x, y


def train_set(n=120, nan_row=None):
    x, y = _digits()
    if nan_row is not None:  # a corrupt row, e.g. a failed preprocessing step
        x[nan_row, 0] = float("nan")
    return TensorDataset(x[:n], y[:n])


def queries(n=10):
    x, y = _digits()
    return TensorDataset(x[N_TRAIN_MAX:N_TRAIN_MAX + n], y[N_TRAIN_MAX:N_TRAIN_MAX + n])


def tuples(n=120, offset=0):
    x, y = _digits()
    return [(x[i], y[i]) for i in range(offset, offset + n)]


def dicts(n=120, offset=0):
    x, y = _digits()
    return [{"input": x[i], "label": y[i]} for i in range(offset, offset + n)]


def query_tuples(n=10):
    return tuples(n, N_TRAIN_MAX)


def query_dicts(n=10):
    return dicts(n, N_TRAIN_MAX)
'''

_TASKS = '''
"""A user's own task: label-smoothed cross-entropy per sample (no grass_dist import)."""
import time

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate


class SmoothedCE:
    def __init__(self, smoothing=0.1):
        self.smoothing = smoothing

    def collate(self, items):
        return default_collate(items)

    def to(self, batch, device):
        return [v.to(device) for v in batch]

    def per_sample_loss(self, model, batch):
        x, y = batch[0], batch[1]
        return F.cross_entropy(model(x), y.long(), reduction="none",
                               label_smoothing=self.smoothing)


class Unhurried(SmoothedCE):
    """SmoothedCE taking `delay_s` longer per batch: a slow model, in miniature."""

    def __init__(self, delay_s=0.05, smoothing=0.1):
        super().__init__(smoothing)
        self.delay_s = delay_s

    def per_sample_loss(self, model, batch):
        time.sleep(self.delay_s)
        return super().per_sample_loss(model, batch)
'''

_TRAIN = '''
"""A user's training recipe: (training subset, seed) -> trained model."""
import torch
import torch.nn.functional as F

from my_pkg.models import build


def fit(dataset, seed, epochs=30, lr=0.05, hidden=24):
    g = torch.Generator().manual_seed(int(seed))
    model = build(hidden, seed=int(seed))
    xs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    ys = torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=g)
        for lo in range(0, len(xs), 32):
            rows = order[lo:lo + 32]
            opt.zero_grad()
            F.cross_entropy(model(xs[rows]), ys[rows]).backward()
            opt.step()
    return model.eval()


if __name__ == "__main__":
    import sys

    from my_pkg.data import train_set

    torch.save(fit(train_set(int(sys.argv[2])), seed=0).state_dict(), sys.argv[1])
'''


_REGRESSION = '''
"""A user's regression: an MLP's one output fitted by MSE to float targets (no checkpoint:
seeded weights are the same on every worker)."""
from collections import OrderedDict

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset, default_collate


def _rows(lo, n):
    x = torch.tensor(load_digits().data[lo:lo + n], dtype=torch.float32) / 16.0
    ink = (x.mean(1) - 0.3) / 0.05  # how much ink, standardised: e.g. -1.2988660335540771
    return TensorDataset(x, ink)


def train_set(n=120):
    return _rows(0, n)


def queries(n=10):
    return _rows(1000, n)


def model(hidden=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(64, hidden), act=nn.ReLU(), out=nn.Linear(hidden, 1))).eval()


class MSE:
    def collate(self, items):
        return default_collate(items)

    def to(self, batch, device):
        return [v.to(device) for v in batch]

    def per_sample_loss(self, model, batch):
        x, y = batch
        return (model(x).squeeze(-1) - y) ** 2
'''


@dataclass
class UserPackage:
    """Where the user's package and its trained checkpoint live."""

    root: Path  # the folder on PYTHONPATH that holds my_pkg/
    checkpoint: Path  # my_pkg.models.load(path=...) loads this (trained on train_set(200))

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a user's shell: my_pkg importable, nothing else changed."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.root), env.get("PYTHONPATH", "")) if p
        )
        env.update(extra)
        return env


@pytest.fixture(scope="session")
def user_pkg(tmp_path_factory) -> UserPackage:
    root = tmp_path_factory.mktemp("user")
    pkg = root / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, text in (
        ("models", _MODELS),
        ("data", _DATA),
        ("tasks", _TASKS),
        ("train", _TRAIN),
        ("regression", _REGRESSION),
        # A module of the user's that needs a package this environment lacks.
        ("plots", "import seaborn_for_plots\n\n\ndef model():\n    pass\n"),
    ):
        (pkg / f"{name}.py").write_text(textwrap.dedent(text).lstrip())
    ckpt = root / "ckpt.pt"
    user = UserPackage(root, ckpt)
    subprocess.run(
        [sys.executable, "-m", "my_pkg.train", str(ckpt), "200"],
        cwd=root,
        env=user.env(),
        check=True,
        timeout=300,
    )
    return user


def run_job(
    job: str,
    *overrides: str,
    user: UserPackage,
    cwd: Path,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`python -m jobs.<job> overrides...` in `cwd`, as a user's shell would run it.

    Outputs default to `cwd/outputs` (run.output_dir's default is relative to the working
    directory). Returns the finished process with text stdout/stderr; never raises on a
    non-zero exit, so tests can assert the exit code and the message.
    """
    return subprocess.run(
        [sys.executable, "-m", f"jobs.{job}", *overrides],
        cwd=cwd,
        env=env or user.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
