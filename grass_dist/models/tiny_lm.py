"""The example language model: a tiny GPT-2 trained on the Python documentation topics.

Training is deterministic given its arguments (seeded initialisation and shuffles, one
BLAS thread). The result is saved with `save_pretrained` under a hash of the arguments;
the first caller trains, every later caller (Ray workers included) loads that directory
with `from_pretrained`, so all replicas are the same model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile

import torch
from torch import nn

from grass_dist.data.text import TextDataset, pydoc_topics
from grass_dist.models.hf import hf_causal_lm
from grass_dist.tasks.language_model import IGNORE, CausalLMTask

log = logging.getLogger(__name__)


def _lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    """Linear warm-up, then cosine decay to a tenth of `lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _train(model: nn.Module, data: TextDataset, args: dict, generator: torch.Generator) -> float:
    """AdamW on the mean next-token loss of shuffled batches; returns the last 50 steps' mean."""
    task = CausalLMTask("sum", batch_tokens=None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args["lr"], betas=(0.9, 0.95))
    order: list[int] = []
    recent: list[float] = []
    model.train()
    for step in range(args["steps"]):
        if len(order) < args["batch_size"]:
            order += torch.randperm(len(data), generator=generator).tolist()
        rows, order = order[: args["batch_size"]], order[args["batch_size"] :]
        batch = task.collate([data[r] for r in rows])
        targets = (batch["labels"][:, 1:] != IGNORE).sum()
        loss = task.token_losses(model, batch).sum() / targets
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, args["steps"], args["warmup"], args["lr"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = [*recent[-49:], loss.item()]
        if step % 100 == 0 or step == args["steps"] - 1:
            log.info("tiny_gpt2 step %d/%d: loss %.3f nats/token", step, args["steps"], recent[-1])
    return sum(recent) / len(recent)


def _save(model: nn.Module, path: str, info: dict) -> None:
    """save_pretrained into a private folder, then rename it into place (first one wins)."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tiny_gpt2-")
    try:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "training.json"), "w") as f:
            json.dump(info, f, indent=2)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; the cache is shared with other users
        os.rename(tmp, path)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_gpt2(
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    steps: int = 400,
    batch_size: int = 8,
    lr: float = 3e-3,
    warmup: int = 30,
    seed: int = 0,
    dtype: str = "float32",
    doc_chars: int = 300,
    n_docs: int | None = None,
    max_length: int = 512,
    long: str = "truncate",
    tokenizer: str = "bytes",
    cache_dir: str = "outputs/cache",
) -> nn.Module:
    """A GPT-2 trained on `pydoc_topics(doc_chars, n_docs, tokenizer, max_length, long)`.

    Trained in float32 and returned in `dtype`, in eval mode; cached in
    `<cache_dir>/tiny_gpt2-<hash of the training arguments>/` (`save_pretrained` layout,
    with training.json holding the arguments and the final training loss).
    """
    args = {
        "n_layer": int(n_layer),
        "n_head": int(n_head),
        "n_embd": int(n_embd),
        "steps": int(steps),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "warmup": int(warmup),
        "seed": int(seed),
        "doc_chars": int(doc_chars),
        "n_docs": None if n_docs is None else int(n_docs),
        "max_length": int(max_length),
        "long": str(long),
        "tokenizer": str(tokenizer),
    }
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"tiny_gpt2-{digest}")
    if not os.path.isdir(path):
        data = pydoc_topics(doc_chars, n_docs, tokenizer, max_length, long)
        tok = data.tokenizer
        config = {
            "n_layer": args["n_layer"],
            "n_head": args["n_head"],
            "n_embd": args["n_embd"],
            "n_positions": args["max_length"],
            "vocab_size": tok.vocab_size,
            "bos_token_id": tok.bos_id,
            "eos_token_id": tok.bos_id,
            # No dropout: nothing random in training but the seeded shuffles.
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
        model = hf_causal_lm("gpt2", config, seed=args["seed"])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # float reductions, hence the weights, independent of cores
        try:
            final = _train(model, data, args, torch.Generator().manual_seed(args["seed"]))
        finally:
            torch.set_num_threads(threads)
        _save(model.eval(), path, {"args": args, "final_train_loss": final})
    return hf_causal_lm(pretrained=path, dtype=dtype)
