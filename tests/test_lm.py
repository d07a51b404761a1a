"""Causal-LM attribution on transformers models: exactness, padding invariance, dtypes."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from grass_dist.compress import build_compressors
from grass_dist.config import CompressionConfig
from grass_dist.data.prompts import IGNORE, PromptDataset
from grass_dist.errors import BadTokensError, ConfigError
from grass_dist.gradients.capture import resolve_layers
from grass_dist.gradients.computer import GradientComputer
from grass_dist.models.hf import hf_causal_lm
from grass_dist.models.state import state_hash
from grass_dist.tasks.language_model import CausalLMTask

VOCAB = 40
ARCHS = ("gpt2", "llama")


def tiny_lm(arch: str, dtype: str = "float32", seed: int = 0):
    if arch == "gpt2":
        config = {"n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 64}
    else:
        config = {
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
        }
    config.update(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    return hf_causal_lm(arch, config, dtype=dtype, seed=seed)


def make_items(lengths, seed=0, ignore_first=(0, 2, 0, 3)):
    gen = torch.Generator().manual_seed(seed)
    items = []
    for n, length in enumerate(lengths):
        ids = torch.randint(1, VOCAB, (length,), generator=gen)
        labels = ids.clone()
        labels[: ignore_first[n % len(ignore_first)]] = IGNORE
        items.append({"input_ids": ids, "labels": labels})
    return items


def direct_grad(model, item, layers):
    """One sample alone, no padding, no mask: autograd's weight gradient per layer,
    as (d_out, d_in + bias) with the bias last (the layout of the identity compressor)."""
    modules = dict(model.named_modules())
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=item["input_ids"][None]).logits[0, :-1].float()
    F.cross_entropy(logits, item["labels"][1:], ignore_index=IGNORE, reduction="sum").backward()
    out = {}
    for name in layers:
        m = modules[name]
        w = m.weight.grad.T if type(m).__name__ == "Conv1D" else m.weight.grad
        out[name] = w if m.bias is None else torch.cat([w, m.bias.grad[:, None]], 1)
    return out


def computer(model, method="identity", k=8, batch_tokens=4096):
    cfg = CompressionConfig(method=method, k=k, seed=3)
    comps = build_compressors(cfg, resolve_layers(model, None))
    return GradientComputer(model, CausalLMTask("sum", batch_tokens), comps)


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_equals_per_sample_autograd(arch):
    model = tiny_lm(arch)
    items = make_items([5, 11, 8, 3])
    comp = computer(model)
    block = comp.phi_rows(items, range(4), batch_size=4)  # one right-padded batch
    layers = list(comp.compressors)
    assert any("lm_head" in n for n in layers) == (arch == "llama")  # GPT-2's head is tied
    for row, item in enumerate(items):
        want = direct_grad(model, item, layers)
        for name in layers:
            got = torch.from_numpy(block.phi[name][row])
            assert rel_err(got, want[name].reshape(-1)) < 1e-5, (name, row)


def test_gpt2_conv1d_layers_and_tied_head():
    model = tiny_lm("gpt2")
    shapes = resolve_layers(model, None)
    assert shapes["transformer.h.0.attn.c_attn"].d_in == 16
    assert shapes["transformer.h.0.attn.c_attn"].d_out == 48
    assert shapes["transformer.h.1.mlp.c_proj"].d_in == 64
    assert "lm_head" not in shapes
    with pytest.raises(ConfigError, match="'lm_head', whose weight is shared"):
        resolve_layers(model, ["lm_head"])


@pytest.mark.parametrize("arch", ARCHS)
def test_factgrass_on_lm_equals_masked_gradient_times_sjlt(arch):
    model = tiny_lm(arch)
    items = make_items([6, 9, 4])
    comp = computer(model, "factgrass", k=8)
    block = comp.phi_rows(items, range(3), batch_size=3)
    for row, item in enumerate(items):
        want = direct_grad(model, item, list(comp.compressors))
        for name, c in comp.compressors.items():
            masked = want[name][c.idx_out][:, c.idx_in].reshape(-1)
            expected = masked @ c.sjlt.matrix()
            assert rel_err(torch.from_numpy(block.phi[name][row]), expected) < 1e-5


def test_factgrass_on_3d_activations_equals_the_definition():
    # phi = SJLT(vec(sum_t g_t[idx_o] a_t[idx_i]^T)) with a = [x, 1], written out per token.
    model = torch.nn.Sequential(torch.nn.Linear(13, 17))
    comp = build_compressors(
        CompressionConfig(k=20, seed=1, mask_out=9, mask_in=14), resolve_layers(model, None)
    )["0"]
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(3, 7, 13, generator=gen), torch.randn(3, 7, 17, generator=gen)
    s = comp.sjlt.matrix()
    for b in range(3):
        m = torch.zeros(9, 14)
        for t in range(7):
            a = torch.cat([x[b, t], torch.ones(1)])
            m += torch.outer(g[b, t][comp.idx_out], a[comp.idx_in])
        torch.testing.assert_close(comp.compress(x, g)[b], m.reshape(-1) @ s, rtol=1e-5, atol=1e-5)
    assert comp.idx_in[-1] == 13  # every input column kept, the bias column included


def _left_padded(task, items, width):
    batch = task.collate(items)
    pad = width - batch["input_ids"].shape[1]
    out = {}
    for key, fill in (("input_ids", 0), ("labels", IGNORE), ("attention_mask", 0)):
        v = batch[key]
        out[key] = torch.cat([torch.full((len(items), pad), fill, dtype=v.dtype), v], 1)
    # Shift each row's real tokens to the right end.
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        for key, fill in (("input_ids", 0), ("labels", IGNORE), ("attention_mask", 0)):
            row = torch.full((width,), fill, dtype=out[key].dtype)
            row[width - n :] = batch[key][b, :n]
            out[key][b] = row
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["identity", "factgrass"])
def test_padding_never_changes_a_samples_phi(arch, method):
    model = tiny_lm(arch)
    comp = computer(model, method)
    sample = make_items([7], seed=5, ignore_first=(2,))[0]
    others = make_items([3, 12, 20], seed=6)
    task = comp.task
    batches = [
        ([sample], 0),  # alone: no padding
        ([sample, others[1]], 0),  # padded to 12
        ([others[0], others[2], sample], 2),  # padded to 20, last in the batch
    ]
    alone = None
    for members, pos in batches:
        phi = comp.phi_batch(task.collate(members))
        if alone is None:
            alone = phi
            continue
        for name in phi:
            assert rel_err(phi[name][pos], alone[name][0]) < 1e-5, name
    left = comp.phi_batch(_left_padded(task, [others[1], sample], width=15))
    for name in left:
        assert rel_err(left[name][1], alone[name][0]) < 1e-5, name


def test_token_budget_batching_groups_by_length_and_keeps_row_order():
    task = CausalLMTask("sum", batch_tokens=40)
    items = make_items([5, 20, 6, 9, 3, 30, 8])
    groups = task.plan_batches(items, max_rows=3)
    assert sorted(j for g in groups for j in g) == list(range(7))
    for g in groups:
        width = max(len(items[j]["input_ids"]) for j in g)
        assert len(g) <= 3 and (len(g) == 1 or len(g) * width <= 40)
    lengths = [[len(items[j]["input_ids"]) for j in g] for g in groups]
    assert [x for g in lengths for x in g] == sorted(x for g in lengths for x in g)
    model = tiny_lm("gpt2")
    a = computer(model, "factgrass", batch_tokens=40).phi_rows(items, range(7), batch_size=3)
    b = computer(model, "factgrass", batch_tokens=None).phi_rows(items, range(7), batch_size=1)
    for name in a.phi:
        assert rel_err(torch.from_numpy(a.phi[name]), torch.from_numpy(b.phi[name])) < 1e-5


def test_mean_reduction_divides_by_target_tokens():
    model = tiny_lm("gpt2")
    items = make_items([6, 10])
    batch = CausalLMTask().collate(items)
    total = CausalLMTask("sum").per_sample_loss(model, batch)
    mean = CausalLMTask("mean").per_sample_loss(model, batch)
    counts = torch.tensor([(it["labels"][1:] != IGNORE).sum() for it in items])
    torch.testing.assert_close(mean, total / counts)
    with pytest.raises(ConfigError, match="task.reduction"):
        CausalLMTask("max")


def test_per_token_query_rows_sum_to_the_completion():
    # The byte tokenizer's ids reach 256: this model has a byte-sized vocabulary.
    model = hf_causal_lm(
        "gpt2",
        {"n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": 257, "n_positions": 64},
        seed=1,
    )
    whole = PromptDataset(["q"], ["Lambdas create "], ["anonymous"], max_length=64)
    split = PromptDataset(["q"], ["Lambdas create "], ["anonymous"], max_length=64, per_token=True)
    assert len(split) == len("anonymous") and split.keys[2] == "q/t2"
    item = whole[0]
    assert (item["labels"] != IGNORE).sum() == len("anonymous")
    assert split.describe(1)["text"] == "Lambdas create a⟦n⟧"
    comp = computer(model, "factgrass", k=8)
    a = comp.phi_rows(whole, range(1), batch_size=8)
    b = comp.phi_rows(split, range(len(split)), batch_size=4)
    for name in a.phi:
        total = torch.from_numpy(b.phi[name]).sum(0)
        assert rel_err(total, torch.from_numpy(a.phi[name][0])) < 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_give_finite_phi_close_to_float32(dtype):
    items = make_items([9, 14, 6, 11])
    ref = computer(tiny_lm("gpt2"), "factgrass").phi_rows(items, range(4), 4)
    low_model = tiny_lm("gpt2", dtype=dtype)
    assert next(low_model.parameters()).dtype == getattr(torch, dtype)
    low = computer(low_model, "factgrass").phi_rows(items, range(4), 4)
    for name in ref.phi:
        got, want = torch.from_numpy(low.phi[name]), torch.from_numpy(ref.phi[name])
        assert torch.isfinite(got).all()
        assert F.cosine_similarity(got, want, dim=1).min() > 0.95, name


def test_models_are_seeded_and_load_from_a_local_directory(tmp_path):
    rng = torch.random.get_rng_state()
    a, b = tiny_lm("llama"), tiny_lm("llama")
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert state_hash(a) == state_hash(b) != state_hash(tiny_lm("llama", seed=1))
    a.save_pretrained(tmp_path / "m")
    loaded = hf_causal_lm(pretrained=str(tmp_path / "m"), dtype="bfloat16")
    assert state_hash(loaded) == state_hash(a.to(torch.bfloat16))
    with pytest.raises(ConfigError, match="not a local directory"):
        hf_causal_lm(pretrained=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="model.dtype"):
        hf_causal_lm("gpt2", dtype="float8")


def test_token_ids_outside_the_vocabulary_are_refused():
    model = tiny_lm("gpt2")
    batch = CausalLMTask().collate(
        [{"input_ids": torch.tensor([1, 99]), "labels": torch.tensor([1, 99])}]
    )
    with pytest.raises(ConfigError, match="outside the model's vocabulary of 40"):
        CausalLMTask().per_sample_loss(model, batch)


def test_a_later_row_with_token_ids_outside_the_vocabulary_is_named_by_row_and_key():
    # Row 0 is checked before the index; a later row fails inside its batch, and is named.
    class Rows(list):
        keys = ["a", "b", "c", "d"]

    rows = Rows(torch.tensor(ids) for ids in ([1, 2, 3], [4, 5, 6], [7, 99, 8], [9, 10, 11]))
    with pytest.raises(BadTokensError, match=r"^rows \[2\] \(keys \['c'\]\): token id 99"):
        computer(tiny_lm("gpt2")).phi_rows(rows, range(4), batch_size=4)


def test_tiny_gpt2_trains_deterministically_caches_and_reloads(tmp_path, monkeypatch):
    from grass_dist.models import tiny_lm

    small = {"n_layer": 1, "n_head": 2, "n_embd": 16, "steps": 3, "n_docs": 12, "max_length": 32}
    model = tiny_lm.tiny_gpt2(**small, cache_dir=str(tmp_path / "a"))
    (folder,) = (tmp_path / "a").iterdir()
    assert folder.name.startswith("tiny_gpt2-") and (folder / "training.json").exists()
    assert not model.training and model.config.vocab_size == 257
    again = tiny_lm.tiny_gpt2(**small, cache_dir=str(tmp_path / "b"))
    assert state_hash(again) == state_hash(model)  # trained twice, bit-identical

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model should have been loaded")

    monkeypatch.setattr(tiny_lm, "_train", no_training)
    loaded = tiny_lm.tiny_gpt2(**small, dtype="bfloat16", cache_dir=str(tmp_path / "a"))
    assert state_hash(loaded) == state_hash(model.to(torch.bfloat16))
    with pytest.raises(AssertionError, match="cached"):
        tiny_lm.tiny_gpt2(**{**small, "steps": 4}, cache_dir=str(tmp_path / "a"))


TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.steps=2"]


@pytest.mark.parametrize(
    "overrides",
    [
        [*TINY, "data.train.n_docs=6", "data.train.max_length=64"],  # the example as shipped
        ["model=hf_causal_lm", "data=text_files"],
    ],
    ids=["tiny_gpt2+pydoc_topics", "hf_causal_lm+text_files"],
)
def test_lm_presets_compose_and_build(tmp_path, overrides):
    from grass_dist.build import (
        build_dataset,
        build_layer_compressors,
        build_model,
        build_task,
        fingerprint,
    )
    from grass_dist.config import JobConfig
    from tests.conftest import compose_cfg

    (tmp_path / "corpus.jsonl").write_text('{"text": "one doc"}\n{"text": "another doc"}\n')
    (tmp_path / "q.jsonl").write_text('{"prompt": "one ", "completion": "doc"}\n')
    files = [f"data.train.paths=[{tmp_path}/corpus.jsonl]", f"data.query.path={tmp_path}/q.jsonl"]
    text_files = "data=text_files" in overrides
    cfg = compose_cfg(
        tmp_path,
        "+example=tiny_gpt2",
        *overrides,
        *(files if text_files else []),
        "compression.k=16",
        small=False,
    )
    job = JobConfig.from_cfg(cfg)
    assert job.index_url.endswith("index-tiny_gpt2")
    model, task = build_model(job), build_task(job)
    comps = build_layer_compressors(job, model)
    train, query = build_dataset(job, "train"), build_dataset(job, "query")
    if text_files:
        assert "lm_head" in comps and "model.layers.1.mlp.down_proj" in comps  # untied Llama
        assert len(train) == 2 and query.describe(0)["text"] == "one ⟦doc⟧"
    else:
        assert "transformer.h.0.attn.c_attn" in comps and "lm_head" not in comps
        assert len(train) == 6 and len(query) == 6
    block = GradientComputer(model, task, comps).phi_rows(train, range(2), batch_size=2)
    assert all(p.shape == (2, 16) for p in block.phi.values())
    fp = fingerprint(job, model, comps, task, train)
    assert fp["task"]["loss"] == "next_token_cross_entropy_sum"


def test_a_prompt_too_long_for_max_length_is_cut_from_its_start_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="grass_dist"):
        fits = PromptDataset(["a"], ["short "], ["end"], max_length=16)
    assert len(fits[0]["input_ids"]) == 1 + len("short end") and caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="grass_dist"):
        cut = PromptDataset(["a", "long"], ["short ", "x" * 40 + " y "], ["end"] * 2, max_length=16)
    ids, labels = cut[1]["input_ids"], cut[1]["labels"]
    assert len(ids) == 16 and (labels != IGNORE).sum() == len("end")  # the completion whole
    assert bytes(ids[:13].tolist()).decode() == ("x" * 40 + " y ")[-13:]  # no start token
    assert "1 prompt(s) lost their first tokens" in caplog.text and "['long']" in caplog.text
    assert "data.query.max_length=16" in caplog.text
