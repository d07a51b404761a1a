"""Text datasets, prompts and tokenizers: local files, truncation, blocks, queries."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from grass_dist.data.prompts import IGNORE, prompts
from grass_dist.data.text import TextDataset, pydoc_documents, pydoc_topics, text_files
from grass_dist.data.tokenizer import ByteTokenizer, load_tokenizer
from grass_dist.errors import ConfigError

DOCS = ["alpha beta gamma", "a much longer document about délta and epsilon", "zeta"]


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("délta ⟦x⟧")
    assert max(ids) < 256 and len(ids) == len("délta ⟦x⟧".encode())
    assert tok.decode([tok.bos_id, *ids]) == "délta ⟦x⟧"


def test_truncate_and_split_rows():
    tok = ByteTokenizer()
    trunc = TextDataset(["a", "b", "c"], DOCS, max_length=8)
    assert len(trunc) == 3 and trunc.keys == ["a", "b", "c"]
    item = trunc[1]
    assert item["input_ids"].tolist() == [tok.bos_id, *tok.encode(DOCS[1])][:8]
    assert torch.equal(item["labels"], item["input_ids"])
    assert trunc.describe(1) == {"key": "b", "text": DOCS[1][:7]}

    split = TextDataset(["a", "b", "c"], DOCS, max_length=8, long="split")
    full = [tok.bos_id, *tok.encode(DOCS[1])]
    blocks = [i for i, k in enumerate(split.keys) if k.startswith("b#")]
    assert [split.keys[i] for i in blocks[:2]] == ["b#0", "b#1"]
    # Blocks overlap by one token: every token but the first is a target exactly once.
    targets = [t for i in blocks for t in split[i]["input_ids"][1:].tolist()]
    assert targets == full[1:]
    assert all(2 <= len(split[i]["input_ids"]) <= 8 for i in range(len(split)))
    with pytest.raises(ConfigError, match="data.long"):
        TextDataset(["a"], ["x"], long="wrap")


def test_local_files_jsonl_parquet_and_text(tmp_path):
    (tmp_path / "d").mkdir()
    with open(tmp_path / "d" / "a.jsonl", "w") as f:
        for i, text in enumerate(DOCS):
            f.write(json.dumps({"body": text, "id": f"doc{i}"}) + "\n")
    pq.write_table(pa.table({"body": ["parquet one", "  ", "parquet two"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("first para\n\nsecond para\n\n")
    ds = text_files(
        [str(tmp_path / "d" / "*.jsonl"), str(tmp_path / "b.parquet")], field="body", max_length=64
    )
    assert ds.keys == ["d/a.jsonl:0", "d/a.jsonl:1", "d/a.jsonl:2", "b.parquet:0", "b.parquet:2"]
    assert ds.describe(4)["text"] == "parquet two"
    keyed = text_files(str(tmp_path / "d" / "a.jsonl"), field="body", key_field="id")
    assert keyed.keys == ["doc0", "doc1", "doc2"]
    paras = text_files(str(tmp_path / "c.txt"), separator="\n\n")
    assert [paras.describe(i)["text"] for i in range(len(paras))] == ["first para", "second para"]
    with pytest.raises(ConfigError, match=r"no column 'text' \(data.field\)"):
        text_files(str(tmp_path / "b.parquet"))
    with pytest.raises(ConfigError, match="matches no local file"):
        text_files(str(tmp_path / "nothing*.jsonl"))


def test_pydoc_documents_and_subsets():
    keys, texts = pydoc_documents()
    assert len(keys) == len(set(keys)) > 500
    assert keys[0].startswith("pydoc/") and all(t.strip() for t in texts)
    for_docs = [t for k, t in zip(keys, texts, strict=True) if k.startswith("pydoc/for/")]
    assert 'The "for" statement' in for_docs[0]
    small = pydoc_topics(n_docs=10, max_length=32)
    assert len(small) == 10 and small.keys[0] == keys[0] and small.keys[-1] == keys[-1]
    with pytest.raises(ConfigError, match="n_docs"):
        pydoc_topics(n_docs=0)


def test_prompts_from_items_and_files(tmp_path):
    ds = prompts(
        items=[{"prompt": "The answer is ", "completion": "42", "key": "q"}], max_length=64
    )
    item = ds[0]
    labels = item["labels"].tolist()
    assert labels.count(IGNORE) == 1 + len("The answer is ") and labels[-2:] == list(b"42")
    assert ds.describe(0) == {"key": "q", "text": "The answer is ⟦42⟧"}
    long = prompts(items=[{"prompt": "x" * 50, "completion": "yz"}], max_length=10)
    assert len(long[0]["input_ids"]) == 10 and long.keys == ["prompt/0"]  # prompt cut on the left
    with pytest.raises(ConfigError, match="completion has 12 tokens"):
        prompts(items=[{"prompt": "a", "completion": "b" * 12}], max_length=10)
    with open(tmp_path / "q.jsonl", "w") as f:
        f.write(json.dumps({"p": "Hello ", "c": "world"}) + "\n")
    from_file = prompts(
        path=str(tmp_path / "q.jsonl"), prompt_field="p", completion_field="c", per_token=True
    )
    assert len(from_file) == 5 and from_file.describe(0)["text"] == "Hello ⟦w⟧"
    with pytest.raises(ConfigError, match="empty prompt and no start token"):
        prompts(items=[{"prompt": "", "completion": "b"}], add_bos=False)
    with pytest.raises(ConfigError, match="exactly one of"):
        prompts()


def test_local_hf_tokenizer_directory(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "[UNK]": 1, "hello": 2, "world": 3}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    core = tokenizers.Tokenizer(model)
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", unk_token="[UNK]"
    ).save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.encode("hello world") == [2, 3] and tok.bos_id == 0 and tok.vocab_size == 4
    ds = TextDataset(["a"], ["hello world hello"], tokenizer=str(tmp_path / "tok"))
    assert ds[0]["input_ids"].tolist() == [0, 2, 3, 2]
    with pytest.raises(ConfigError, match="neither 'bytes' nor a local directory"):
        load_tokenizer(str(tmp_path / "missing"))
