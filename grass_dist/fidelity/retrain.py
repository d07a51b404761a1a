"""How LDS ground truth retrains the model on a training subset: the user's recipe, or the
model builder's own.

`lds.train` names a callable `(dataset, seed, **args) -> nn.Module`: `dataset` is a
`torch.utils.data.Subset` of the built `data.train` (the subset's rows, in their order),
`seed` an int the recipe must seed its initialisation and shuffles from, and `args` the
other keys under `lds.train`. With `lds.train=null` the built-in digits builders
(`grass_dist.models.digits.train_on`) replay their own recipe; any other model needs `lds.train`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from torch import nn
from torch.utils.data import Subset

from grass_dist.build import build_dataset, check_arguments, locate_target
from grass_dist.config import JobConfig
from grass_dist.errors import ConfigError
from grass_dist.models.digits import retrainable, train_on

Retrain = Callable[[Sequence[int], int], nn.Module]

# The recipe's first two parameters are filled by the retraining task, not by the config.
_SUPPLIED = 2


def check(job: JobConfig) -> None:
    """Refuse, before any Ray task starts, a job whose model has no retraining recipe or
    whose `lds.train` callable cannot take the configured arguments."""
    node = job.lds.train
    if node is None:
        if not retrainable(job.model):
            raise ConfigError(
                f"LDS ground truth retrains the model, but model._target_="
                f"{job.model.get('_target_')!r} has no built-in training recipe; give yours "
                f"with +lds.train._target_=my_pkg.train.fit (a callable (dataset, seed, "
                f"**args) -> nn.Module), or use model=digits_mlp or model=digits_cnn"
            )
        return
    fn = locate_target(node, "lds.train")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to check: the first call will tell
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < _SUPPLIED and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise ConfigError(
            f"lds.train._target_={node['_target_']!r} takes {len(positional)} positional "
            f"argument(s); a retraining recipe is called as fn(dataset, seed, **args)"
        )
    if len(positional) >= _SUPPLIED and "seed" not in positional[1].name:
        # The seed (up to 2**31) would land in it: epochs=2**31 trains for good, silently.
        raise ConfigError(
            f"lds.train._target_={node['_target_']!r} would take the retraining seed as its "
            f"argument {positional[1].name!r}: a retraining recipe is called as fn(dataset, "
            f"seed, **args); make its second parameter the seed"
        )
    check_arguments(fn, node, "lds.train", supplied=_SUPPLIED)


def retrainer(job: JobConfig) -> Retrain:
    """`retrain(rows, seed)`: a model trained afresh on training rows `rows`, in eval mode."""
    node = job.lds.train
    if node is None:
        return lambda rows, seed: train_on(job.model, rows, seed)
    fn = locate_target(node, "lds.train")
    args = {k: v for k, v in node.items() if k != "_target_"}
    train = build_dataset(job, "train")

    def retrain(rows: Sequence[int], seed: int) -> nn.Module:
        model = fn(Subset(train, list(rows)), int(seed), **args)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"lds.train._target_={node['_target_']!r} returned a {type(model).__name__}, "
                f"not an nn.Module: return the trained model"
            )
        # Outputs are measured like at inference: no dropout, frozen batch-norm statistics.
        return model.eval()

    return retrain
