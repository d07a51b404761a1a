"""Compressors whose masks are learned (Selective Mask) on a sample of training gradients.

`fit` turns a `GradSample` into the state bytes (safetensors of the sorted indices);
`from_state` rebuilds the compressor from those bytes. The bytes are stored in the index
(see `grass_dist.gradients.learned_state`) and their sha256 is part of the compressor spec, so every
worker and every query uses the very mask the index was built with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from grass_dist.compress.base import (
    Compressor,
    LayerShape,
    check_k,
    linear_gradient,
    require_linear,
)
from grass_dist.compress.flat import MaskSketch
from grass_dist.compress.linear import MaskedFactors, check_masked_size, mask_budget
from grass_dist.compress.selective import factor_inner, fit_masks, flat_inner
from grass_dist.errors import ConfigError, FingerprintMismatchError
from grass_dist.runtime.seeding import generator

log = logging.getLogger(__name__)

Grad = tuple[torch.Tensor, torch.Tensor] | torch.Tensor


@dataclass
class GradSample:
    """One layer's per-sample gradients for fitting: Linear factors (x, g) or flat v (n, p)."""

    train: Grad
    heldout: Grad

    def flat(self, shape: LayerShape) -> tuple[torch.Tensor, torch.Tensor]:
        """(train (n_t, p), heldout (n_h, p)) flat gradients, forming vec(G) for Linear layers."""
        if isinstance(self.train, torch.Tensor):
            return self.train, self.heldout
        return linear_gradient(*self.train, shape), linear_gradient(*self.heldout, shape)


class LearnedCompressor(Compressor):
    """Base of compressors with learned state; their spec names the fit's settings and the
    state's sha256."""

    learned: ClassVar[bool] = True
    state: bytes
    fit_settings: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: Any, name: str, shape: LayerShape) -> Compressor:
        raise ConfigError(
            f"compression method {cls.method!r} for layer {name!r} is learned from training "
            "gradients and stored in the index: pipeline.prepare fits it, and "
            "grass_dist.build.build_layer_compressors(job, model, index) loads it"
        )

    @classmethod
    def check(cls, cfg: Any, name: str, shape: LayerShape) -> None:
        """Refuse, before any gradient is fitted, the settings `from_state` would refuse."""
        check_k(cfg.k, name, shape)

    @classmethod
    def fit(cls, cfg: Any, name: str, shape: LayerShape, sample: GradSample) -> bytes:
        """Learn the masks from `sample`; returns the state bytes."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, cfg: Any, name: str, shape: LayerShape, state: bytes) -> Compressor:
        """Rebuild from state bytes written by `fit`."""
        raise NotImplementedError

    def _learned_spec(self) -> dict[str, Any]:
        return {
            "selective": self.fit_settings,
            "state_sha256": hashlib.sha256(self.state).hexdigest(),
        }


def fit_settings(cfg: Any) -> dict[str, Any]:
    """The `compression.selective` fields the masks depend on (part of the spec)."""
    return dataclasses.asdict(cfg.selective)


def _fit(cfg: Any, name: str, inner, dims: list[int], budgets: list[int], keys: list[str]):
    s = cfg.selective
    result = fit_masks(
        inner,
        dims,
        budgets,
        epochs=s.epochs,
        lr=s.lr,
        lam=s.lam,
        min_spearman=s.min_spearman,
        check_every=s.check_every,
        gen=generator(s.seed, name, "selective"),
    )
    log.info(
        "selective mask for %s: chosen at step %d, Spearman %.3f on the fit rows, sizes %s",
        name,
        result.epochs,
        result.spearman,
        [int(i.numel()) for i in result.indices],
    )
    # One metadata key: safetensors does not fix the order of several, and the bytes are hashed.
    meta = {"fit": json.dumps({"epoch": result.epochs, "spearman": round(result.spearman, 6)})}
    return st_save(dict(zip(keys, result.indices, strict=True)), metadata=meta)


def _indices(state: bytes, key: str, dim: int, size: int, name: str) -> torch.Tensor:
    idx = st_load(state)[key].to(torch.long)
    ok = (
        idx.numel() == size
        and bool((idx[1:] > idx[:-1]).all())
        and (idx.numel() == 0 or (int(idx[0]) >= 0 and int(idx[-1]) < dim))
    )
    if not ok:
        raise FingerprintMismatchError(
            f"the learned mask {key!r} of layer {name!r} has {idx.numel()} indices but these "
            f"compression settings need {size} sorted indices below {dim}: the index was built "
            f"with other settings. Fix: use the index's settings, or a new store.url."
        )
    return idx


class SelectiveFactGraSSCompressor(MaskedFactors, LearnedCompressor):
    """Selective masks on both factors (sizes as FactGraSS's), outer products, SJLT to k."""

    method = "selective_factgrass"

    @classmethod
    def check(cls, cfg: Any, name: str, shape: LayerShape) -> None:
        shape = require_linear(cls.method, name, shape)
        check_k(cfg.k, name, shape)
        check_masked_size(cfg.k, name, *mask_budget(cfg, shape))

    @classmethod
    def fit(cls, cfg: Any, name: str, shape: LayerShape, sample: GradSample) -> bytes:
        shape = require_linear(cls.method, name, shape)
        inner = factor_inner(sample.train, sample.heldout, shape)
        dims = [shape.d_out, shape.cols]
        return _fit(cfg, name, inner, dims, list(mask_budget(cfg, shape)), ["idx_out", "idx_in"])

    @classmethod
    def from_state(cls, cfg: Any, name: str, shape: LayerShape, state: bytes) -> Compressor:
        shape = require_linear(cls.method, name, shape)
        check_k(cfg.k, name, shape)
        k_o, k_i = mask_budget(cfg, shape)
        idx_out = _indices(state, "idx_out", shape.d_out, k_o, name)
        idx_in = _indices(state, "idx_in", shape.cols, k_i, name)
        out = cls(name, shape, cfg.k, cfg.seed, idx_out, idx_in, cfg.sjlt_c)
        out.state, out.fit_settings, out.blowup = state, fit_settings(cfg), cfg.blowup
        return out

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "blowup": self.blowup, **self._learned_spec()}


class SelectiveFlat(MaskSketch, LearnedCompressor):
    """A selective mask of vec(G) (any layer), optionally followed by an SJLT to k."""

    sketch: ClassVar[bool]

    @classmethod
    def budget(cls, cfg: Any, shape: LayerShape) -> int:
        return min(shape.numel, cfg.blowup * cfg.k if cls.sketch else cfg.k)

    @classmethod
    def fit(cls, cfg: Any, name: str, shape: LayerShape, sample: GradSample) -> bytes:
        inner = flat_inner(*sample.flat(shape))
        return _fit(cfg, name, inner, [shape.numel], [cls.budget(cfg, shape)], ["idx"])

    @classmethod
    def from_state(cls, cfg: Any, name: str, shape: LayerShape, state: bytes) -> Compressor:
        check_k(cfg.k, name, shape)
        idx = _indices(state, "idx", shape.numel, cls.budget(cfg, shape), name)
        out = cls(name, shape, cfg.seed, idx, cfg.k if cls.sketch else None, cfg.sjlt_c)
        out.state, out.fit_settings = state, fit_settings(cfg)
        return out

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), **self._learned_spec()}


class SelectiveGraSSCompressor(SelectiveFlat):
    """Selective mask to k' = blowup * k coordinates, then SJLT to k."""

    method = "selective_grass"
    sketch = True


class SelectiveMaskCompressor(SelectiveFlat):
    """Selective mask to k coordinates, no sketch."""

    method = "selective_mask"
    sketch = False
