"""What a language-model user hands the causal-LM task: tokenizers (a saved directory, an
object, the model's own or not), prompts and completions, plain items, rows that do not fit."""

from __future__ import annotations

import shutil

import pytest
import torch

from grass_dist.data.prompts import IGNORE, PromptDataset
from grass_dist.data.text import TextDataset
from grass_dist.data.tokenizer import load_tokenizer
from grass_dist.errors import ConfigError
from grass_dist.models.hf import hf_causal_lm
from grass_dist.tasks.language_model import CausalLMTask, context_length
from tests.helpers import bpe_tokenizer

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

TEXTS = [
    'The "for" statement is used to iterate over the elements of a sequence.',
    "Lambda expressions are used to create anonymous functions.",
    "A mapping object maps hashable values to arbitrary objects.",
] * 20


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory):
    """A GPT-2 saved with its tokenizer, as `save_pretrained` leaves a user's model."""
    where = tmp_path_factory.mktemp("my_lm")
    tok = bpe_tokenizer(TEXTS)
    config = {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 32, "vocab_size": len(tok)}
    hf_causal_lm("gpt2", config).save_pretrained(where)
    tok.save_pretrained(where)
    return str(where), tok


def test_prompt_and_completion_are_tokenised_as_one_text(saved_lm):
    path, tok = saved_lm
    prompt, completion = "The for statement ", "iterates over"
    row = PromptDataset(["q"], [prompt], [completion], tokenizer=path)[0]
    joined = tok(prompt + completion, add_special_tokens=False)["input_ids"]
    # The model read such text as one: the ids are the joined text's (after the start token),
    # and the seam token (" iterates"'s first piece holds the prompt's space) is a target.
    assert row["input_ids"].tolist() == [tok.bos_token_id, *joined]
    alone = tok(prompt, add_special_tokens=False)["input_ids"]
    assert alone != joined[: len(alone)]  # encoding the parts alone differs at the seam
    targets = row["input_ids"][row["labels"] != IGNORE].tolist()
    assert tok.decode(targets) == " " + completion
    assert (row["labels"][: len(row["labels"]) - len(targets)] == IGNORE).all()
    # Per-token rows split the same tokens; bytes join unchanged.
    per_token = PromptDataset(["q"], [prompt], [completion], tokenizer=path, per_token=True)
    assert len(per_token) == len(targets)
    raw = PromptDataset(["q"], [prompt], [completion])[0]["input_ids"].tolist()
    assert raw == [256, *(prompt + completion).encode()]


def test_a_tokenizer_object_is_the_saved_one(saved_lm):
    path, tok = saved_lm
    by_path, by_object = TextDataset(["a"], TEXTS[:1], path), TextDataset(["a"], TEXTS[:1], tok)
    assert torch.equal(by_path[0]["input_ids"], by_object[0]["input_ids"])
    assert by_path[0]["input_ids"][0] == tok.bos_token_id
    assert by_path.describe(0)["text"] == TEXTS[0]  # the report shows no start token
    with pytest.raises(
        ConfigError, match=r"tokenizer=3 \(int\) is no tokenizer: give 'bytes', a local"
    ):
        load_tokenizer(3)


def test_text_tokenised_otherwise_than_the_saved_model_is_refused(saved_lm, tmp_path):
    path, tok = saved_lm
    model, task = hf_causal_lm(pretrained=path), CausalLMTask()
    keys = [str(i) for i in range(3)]
    with pytest.raises(ConfigError) as info:
        task.check_data(model, TextDataset(keys, TEXTS[:3], "bytes", max_length=32), "train")
    said = str(info.value)
    assert "the UTF-8 byte tokenizer ('bytes')" in said and f"tokenizer={path}" in said
    other = tmp_path / "other_tok"
    bpe_tokenizer(TEXTS, vocab_size=280).save_pretrained(other)
    with pytest.raises(ConfigError, match=f"tokenised with the tokenizer in {other}"):
        task.check_data(model, TextDataset(keys, TEXTS[:3], str(other), max_length=32), "query")
    # The model's own tokenizer, a copy of it elsewhere, or the object itself pass.
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    for same in (path, str(copy), tok):
        task.check_data(model, TextDataset(keys, TEXTS[:3], same, max_length=32), "train")
    # A model saved without a tokenizer says nothing about the data's.
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    data = TextDataset(keys, TEXTS[:3], "bytes", max_length=32)
    task.check_data(hf_causal_lm(pretrained=str(bare)), data, "train")


def test_rows_longer_than_learned_positions_are_refused_before_and_while_computing():
    task, data = CausalLMTask(), TextDataset(["a"], TEXTS[:1], max_length=64)
    gpt2 = hf_causal_lm("gpt2", {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 32})
    assert context_length(gpt2) == ("config.n_positions", 32)
    with pytest.raises(ConfigError, match=r"data.train.max_length=64 is longer than the model's "):
        task.check_data(gpt2, data, "train")
    batch = task.collate([data[0]])  # 65 bytes + start token, cut to 64
    with pytest.raises(ConfigError, match=r"a row has 64 tokens, more than .* 32 positions"):
        task.per_sample_loss(gpt2, batch)
    # Rotary positions (Llama) have no table of positions: longer rows are the model's call.
    llama = hf_causal_lm(
        "llama",
        {
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "vocab_size": 257,
        },
    )
    assert context_length(llama) is None
    task.check_data(llama, data, "train")
    assert torch.isfinite(task.per_sample_loss(llama, batch)).all()


def test_plain_items_are_token_rows_and_text_is_refused_naming_the_datasets():
    model = hf_causal_lm("gpt2", {"n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": 50})
    task, ids = CausalLMTask(), [3, 7, 9, 4, 1]
    full = task.per_sample_loss(model, task.collate([{"input_ids": torch.tensor(ids)}]))
    for item in (ids, torch.tensor(ids), {"input_ids": ids, "labels": ids}):
        assert torch.allclose(task.per_sample_loss(model, task.collate([item])), full)
    assert task.plan_batches([ids, ids[:3]], 8) == [[1, 0]]
    refusals = [
        ("hello world", r"an item is text \('hello world'\).*TextDataset"),
        ({"text": "hi"}, r"an item has keys \['text'\]"),
        (torch.ones(2, 3, dtype=torch.long), r"input_ids of shape \(2, 3\)"),
        ([0.5, 1.5], "dtype torch.float32"),
        ([5], "an item has 1 token"),
    ]
    for item, said in refusals:
        with pytest.raises(ConfigError, match=said):
            task.collate([item])
    with pytest.raises(ConfigError, match=r"token id -1 is outside the model's vocabulary of 50"):
        task.per_sample_loss(model, task.collate([[3, -1, 4]]))
    base = transformers.AutoModel.from_config(model.config)  # no LM head
    with pytest.raises(ConfigError, match="has no logits.*AutoModelForCausalLM rather than"):
        task.per_sample_loss(base, task.collate([ids]))


def test_empty_documents_are_refused_naming_them():
    with pytest.raises(
        ConfigError, match=r"2 text document\(s\) are empty or blank \(keys \['b', "
    ):
        TextDataset(["a", "b", "c"], ["text", "", "  \n"])


def test_the_api_names_what_was_passed_and_what_the_task_takes(tmp_path):
    import grass_dist as gd
    from grass_dist.tasks_lm import causal_lm

    model = hf_causal_lm("gpt2", {"n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": 257})
    with pytest.raises(ConfigError, match=r"row 0 of data.train: task causal_lm: an item is text"):
        gd.Index.build(model, ["some text", "more"], task=causal_lm(), store=tmp_path / "i")
    rows = TextDataset(["a", "b"], ["some text", "more"])
    with pytest.raises(ConfigError, match="needs a transformers causal LM .* is a Linear"):
        gd.Index.build(torch.nn.Linear(4, 2), rows, task=causal_lm(), store=tmp_path / "i")
    # An error of the model's own names the objects passed, not their stand-in target.
    with pytest.raises(ConfigError) as info:
        gd.Index.build(torch.nn.Linear(4, 2), [(torch.zeros(5), 1)], store=tmp_path / "i")
    assert "and the model you passed (a torch.nn.modules.linear.Linear): RuntimeError" in str(
        info.value
    )
    assert not (tmp_path / "i").exists()
