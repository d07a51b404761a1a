"""Tiny models and exact references shared by the tests."""

from __future__ import annotations

import shutil
import subprocess
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap


class SeqModel(nn.Module):
    """Linear layers on (B, T, d) activations, mean-pooled to class logits."""

    def __init__(self, d_in: int = 5, hidden: int = 7, classes: int = 3):
        super().__init__()
        self.proj = nn.Linear(d_in, hidden)
        self.mix = nn.Linear(hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(torch.relu(self.proj(x))))
        return self.head(h.mean(1))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's thread count is `n` inside the block, what it was after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mlp(d_in: int = 6, hidden: int = 8, classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(fc1=nn.Linear(d_in, hidden), act=nn.ReLU(), out=nn.Linear(hidden, classes))
    )


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact per-sample gradients {param name: (B, *shape)} from torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def layer_grad(grads: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """(B, d_out, d_in + bias): weight gradient with the bias gradient as the last column."""
    w = grads[f"{layer}.weight"]
    b = grads.get(f"{layer}.bias")
    return w if b is None else torch.cat([w, b.unsqueeze(-1)], dim=-1)


class ConvNet(nn.Module):
    """Conv2d + LayerNorm + Linear head on (B, 1, 5, 5) images (flat and factorised layers)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.norm = nn.LayerNorm(27)
        self.head = nn.Linear(27, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.conv(x)).flatten(1)))


class EmbedNet(nn.Module):
    """Embedding -> Linear on token ids (B, T), mean-pooled to class logits."""

    def __init__(self, vocab: int = 11, dim: int = 4, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids))).mean(1)


def module_grad(grads: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """(B, p): a module's per-sample parameter gradients, flattened in parameter order."""
    names = [n for n in grads if n.rsplit(".", 1)[0] == module]
    return torch.cat([grads[n].flatten(1) for n in names], 1)


def assert_topk_close(rows, values, exact, k: int, largest: bool, tol: float) -> None:
    """A top-k (rows, values: (Q, k)) against exact scores (n, Q) float64, up to rounding.

    Sorted values must agree within `tol`; every returned row's exact score must match its
    value; the row sets may differ only by rows tied with the k-th value within `tol`.
    """
    exact = torch.as_tensor(exact, dtype=torch.float64)
    rows = torch.tensor(rows)
    values = torch.tensor(values, dtype=torch.float64)
    want_v, want_r = torch.topk(exact.T, k, dim=1, largest=largest)
    assert (values - want_v).abs().max() <= tol, float((values - want_v).abs().max())
    assert (exact.T.gather(1, rows) - values).abs().max() <= tol
    for q in range(rows.shape[0]):
        got, want = set(rows[q].tolist()), set(want_r[q].tolist())
        assert len(got) == k
        kth = want_v[q, -1]
        for r in got ^ want:
            assert abs(float(exact[r, q] - kth)) <= tol, (q, r)


def bpe_tokenizer(texts: list[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on `texts`, nothing downloaded."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    core = tokenizers.Tokenizer(tokenizers.models.BPE())
    core.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


class AttnNet(nn.Module):
    """A transformer encoder layer, mean-pooled to class logits, on (B, T, 8) inputs: its
    attention's out_proj is an nn.Linear that nn.MultiheadAttention never calls as a module."""

    def __init__(self, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


class TwiceNet(nn.Module):
    """One Linear layer applied twice per forward (a shared block), then a head."""

    def __init__(self, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Linear(6, 6)
        self.head = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.block(torch.tanh(self.block(x)))))


CHROMIUM = shutil.which("chromium")


def chromium_args(profile: Path) -> list[str]:
    """Headless Chromium, offline and with its own profile folder, at 900 x 700."""
    return [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--window-size=900,700",
    ]  # fmt: skip


def rendered_dom(page: Path, profile: Path) -> str:
    """The DOM of an HTML file as headless Chromium renders it."""
    return subprocess.run(
        [*chromium_args(profile), "--dump-dom", page.as_uri()],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout


def assert_answers_equal_topk_table(answers, table) -> None:
    """Service answers (one per query row) equal a batch job's top-k table."""
    for q, answer in enumerate(answers):
        for kind, label in (("proponent", "proponents"), ("opponent", "opponents")):
            want = table[(table["query_row"] == q) & (table["kind"] == kind)]
            want = want.sort_values("rank")
            got = answer[label]
            assert [g["train_row"] for g in got] == want["train_row"].tolist()
            assert [g["train_key"] for g in got] == want["train_key"].tolist()
            np.testing.assert_allclose(
                [g["score"] for g in got], want["score"], rtol=1e-5, atol=1e-7
            )


class PlainCE:
    """A user's own task as README asks for one (collate, to, per_sample_loss), without
    the service's `decode_example` hook: cross-entropy on (input, label) items."""

    def collate(self, items):
        return torch.utils.data.default_collate(items)

    def to(self, batch, device):
        return [v.to(device) for v in batch]

    def per_sample_loss(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1].long(), reduction="none")


class Outputs(torch.nn.Module):
    """A model that returns its logits in a dict (as Hugging Face models do), or a tuple."""

    def __init__(self, inner: torch.nn.Module, how: str):
        super().__init__()
        self.inner, self.how = inner, how

    def forward(self, x: torch.Tensor):
        logits = self.inner(x)
        return {"logits": logits, "hidden": x} if self.how == "dict" else (logits, x)
