"""Small models trained on the digits data, cached on disk so every worker gets one model.

Training is deterministic given its arguments (local generator, one BLAS thread), and the
trained weights are cached under a hash of those arguments: the first caller trains,
every later caller (other processes included) loads the identical state_dict.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from grass_dist.data import digits
from grass_dist.errors import ConfigError

_BATCH_SIZE = 64


def _stack(dataset: Dataset, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Items `rows` as (len(rows), 64) inputs and (len(rows),) labels.

    Used instead of a DataLoader, whose iterator draws a seed from the global torch RNG.
    """
    xs, ys = zip(*(dataset[i] for i in rows), strict=True)
    return torch.stack(xs), torch.stack(ys)


def _init(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """PyTorch's default Linear / Conv2d initialisation, drawn from `generator`.

    Models are built on "meta" and materialised here, so that building one neither depends
    on nor advances the global torch RNG. Each parameter is replaced by an uninitialised one
    of its shape (what `to_empty` does, without the symbolic-shapes machinery, and sympy,
    that its meta-to-CPU copy imports: 0.4-0.9 s of every job's start and of every worker's).
    """
    for module in model.modules():
        if any(True for _ in module.buffers(recurse=False)):
            raise TypeError(f"{type(module).__name__} holds buffers, which _init leaves on meta")
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(torch.empty(param.shape, dtype=param.dtype)))
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            fan_in = module.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)
    return model


def _mlp(hidden: list[int], generator: torch.Generator) -> nn.Sequential:
    """64 -> hidden... -> 10 with ReLUs; Linear layers are named fc1, fc2, ..., out."""
    widths = [64, *hidden]
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (d_in, d_out) in enumerate(pairwise(widths), start=1):
        layers[f"fc{i}"] = nn.Linear(d_in, d_out, device="meta")
        layers[f"act{i}"] = nn.ReLU()
    layers["out"] = nn.Linear(widths[-1], 10, device="meta")
    return _init(nn.Sequential(layers), generator)


def _cnn(channels: list[int], hidden: int, generator: torch.Generator) -> nn.Sequential:
    """(B, 64) -> 1x8x8 -> 3x3 convs conv1, conv2, ... (ReLU) -> 2x2 max-pool -> fc1 -> out."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(image=nn.Unflatten(1, (1, 8, 8)))
    for i, (c_in, c_out) in enumerate(pairwise([1, *channels]), start=1):
        layers[f"conv{i}"] = nn.Conv2d(c_in, c_out, 3, padding=1, device="meta")
        layers[f"cact{i}"] = nn.ReLU()
    layers["pool"] = nn.MaxPool2d(2)
    layers["flat"] = nn.Flatten()
    layers["fc1"] = nn.Linear(channels[-1] * 16, hidden, device="meta")
    layers["act1"] = nn.ReLU()
    layers["out"] = nn.Linear(hidden, 10, device="meta")
    return _init(nn.Sequential(layers), generator)


def _train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    generator: torch.Generator,
) -> None:
    """Minibatch Adam on cross-entropy of x (N, 64), y (N,); shuffles come from `generator`."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(_BATCH_SIZE):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def _fit(
    args: dict[str, Any],
    build: Callable[[torch.Generator], nn.Module],
    rows: Sequence[int] | None = None,
) -> nn.Module:
    """`build(generator)` trained on rows `rows` (None: all) of the digits train split.

    One generator seeded with args["seed"] draws the initialisation, then the shuffles; one
    BLAS thread makes the float reductions, hence the weights, independent of core count.
    """
    generator = torch.Generator(device="cpu").manual_seed(args["seed"])
    model = build(generator)
    dataset = digits("train", args["n_train"], args["n_query"], args["data_seed"])
    x, y = _stack(dataset, range(len(dataset)) if rows is None else rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(model, x, y, args["epochs"], args["lr"], generator)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _trained(
    kind: str,
    args: dict[str, Any],
    build: Callable[[torch.Generator], nn.Module],
    cache_dir: str,
) -> nn.Module:
    """`build(generator)` trained on the digits train split, cached under a hash of `args`.

    `args` holds epochs, lr, seed, n_train, n_query, data_seed and the architecture.
    The file is `<cache_dir>/<kind>-<hash>.pt`; the model comes back in eval mode.
    """
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{kind}-{digest}.pt")
    if os.path.exists(path):
        model = build(torch.Generator(device="cpu").manual_seed(args["seed"]))
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    model = _fit(args, build)

    # Concurrent callers each write a private temp file and atomically rename it, so a
    # reader never sees a partial file; all writers produce identical bytes anyway.
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{kind}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(model.state_dict(), f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is shared with other users
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return model.eval()


def _recipe(
    epochs: int, lr: float, seed: int, n_train: int, n_query: int, data_seed: int
) -> dict[str, Any]:
    return {
        "epochs": int(epochs),
        "lr": float(lr),
        "seed": int(seed),
        "n_train": int(n_train),
        "n_query": int(n_query),
        "data_seed": int(data_seed),
    }


def _mlp_recipe(
    hidden: list[int],
    epochs: int,
    lr: float,
    seed: int,
    n_train: int,
    n_query: int,
    data_seed: int,
) -> tuple[dict[str, Any], Callable[[torch.Generator], nn.Module]]:
    args = {
        "hidden": [int(h) for h in hidden],
        **_recipe(epochs, lr, seed, n_train, n_query, data_seed),
    }
    return args, lambda gen: _mlp(args["hidden"], gen)


def _cnn_recipe(
    channels: list[int],
    hidden: int,
    epochs: int,
    lr: float,
    seed: int,
    n_train: int,
    n_query: int,
    data_seed: int,
) -> tuple[dict[str, Any], Callable[[torch.Generator], nn.Module]]:
    args = {
        "channels": [int(c) for c in channels],
        "hidden": int(hidden),
        **_recipe(epochs, lr, seed, n_train, n_query, data_seed),
    }
    return args, lambda gen: _cnn(args["channels"], args["hidden"], gen)


def digits_mlp(
    hidden: list[int] = [128, 64],  # noqa: B006 -- never mutated; the Hydra-facing default
    epochs: int = 40,
    lr: float = 1e-2,
    seed: int = 0,
    n_train: int = 1000,
    n_query: int = 100,
    data_seed: int = 0,
    cache_dir: str = "outputs/cache",
) -> nn.Module:
    """The digits MLP trained on `digits("train", n_train, n_query, data_seed)`, in eval mode.

    Maps (B, 64) pixel vectors to (B, 10) logits. Loaded from
    `<cache_dir>/digits_mlp-<hash of the other arguments>.pt` when that file exists,
    otherwise trained (a few seconds on CPU) and cached there.
    """
    args, build = _mlp_recipe(hidden, epochs, lr, seed, n_train, n_query, data_seed)
    return _trained("digits_mlp", args, build, cache_dir)


def digits_cnn(
    channels: list[int] = [32, 32],  # noqa: B006 -- never mutated; the Hydra-facing default
    hidden: int = 32,
    epochs: int = 20,
    lr: float = 1e-2,
    seed: int = 0,
    n_train: int = 1000,
    n_query: int = 100,
    data_seed: int = 0,
    cache_dir: str = "outputs/cache",
) -> nn.Module:
    """A small CNN trained like `digits_mlp`: (B, 64) pixels, reshaped to (B, 1, 8, 8) inside.

    Modules conv1, conv2, ... (3x3, padding 1, ReLU), a 2x2 max-pool, then Linear fc1
    (channels[-1] * 16 -> hidden) and out (hidden -> 10). Cached as
    `<cache_dir>/digits_cnn-<hash>.pt`.
    """
    args, build = _cnn_recipe(channels, hidden, epochs, lr, seed, n_train, n_query, data_seed)
    return _trained("digits_cnn", args, build, cache_dir)


# Model builders whose training recipe `train_on` can replay on a subset of the rows.
# Keyed by the stable config paths (conf/model/*.yaml) and the defining module's paths.
_RETRAINABLE = {
    f"grass_dist.models{home}.{fn.__name__}": (fn, recipe)
    for fn, recipe in ((digits_mlp, _mlp_recipe), (digits_cnn, _cnn_recipe))
    for home in ("", ".digits")
}


def retrainable(model: dict[str, Any]) -> bool:
    """Whether `train_on` knows the training recipe of this `model` config node."""
    return model.get("_target_") in _RETRAINABLE


def train_on(model: dict[str, Any], rows: Sequence[int], seed: int) -> nn.Module:
    """The model of a `model` config node, trained afresh on training rows `rows` only.

    Same architecture and recipe (epochs, lr, batch size, data split) as the builder named
    by `_target_`, with `seed` in place of model.seed (initialisation and shuffles); nothing
    is cached. This is what linear-datamodeling ground truth retrains on each subset when
    no `lds.train` recipe is given (`grass_dist.fidelity.retrain`).

    Args:
        model: the Hydra node, e.g. {"_target_": "grass_dist.models.digits_mlp", ...}.
        rows: indices into the digits train split (sorted or not; order is kept).
        seed: the training seed.

    Returns:
        The trained model in eval mode.
    """
    if not retrainable(model):
        raise ConfigError(
            f"model._target_={model.get('_target_')!r} has no known training recipe, so its "
            f"ground truth cannot be built by retraining; give yours with "
            f"+lds.train._target_=my_pkg.train.fit or use one of {sorted(_RETRAINABLE)}"
        )
    builder, recipe = _RETRAINABLE[model["_target_"]]
    given = {k: v for k, v in model.items() if k != "_target_"}
    bound = inspect.signature(builder).bind(**given)
    bound.apply_defaults()
    kwargs = {k: v for k, v in bound.arguments.items() if k != "cache_dir"}
    kwargs["seed"] = int(seed)
    args, build = recipe(**kwargs)
    return _fit(args, build, list(rows))


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 512) -> float:
    """Share of items whose argmax logit equals the label; evaluated in eval mode."""
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, len(dataset), batch_size):
            x, y = _stack(dataset, range(start, min(start + batch_size, len(dataset))))
            correct += int((model(x).argmax(dim=-1) == y).sum())
    finally:
        model.train(was_training)
    return correct / len(dataset)
