"""Text datasets, prompts and tokenizers: local files, truncation, blocks, queries."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from grass_dist.data.prompts import IGNORE, prompts
from grass_dist.data.text import TextDataset, pydoc_documents, pydoc_topics, text_files
from grass_dist.data.tokenizer import ByteTokenizer, load_tokenizer
from grass_dist.errors import BadRecordError, ConfigError
from tests.conftest import ROOT

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
    with pytest.raises(ConfigError, match=r"long='wrap' is not .* \(in a job: data.train.long\)"):
        TextDataset(["a"], ["x"], long="wrap")
    with pytest.raises(ConfigError, match=r"max_length=1 must be >= 2, .*data.train.max_length"):
        TextDataset(["a"], ["x"], max_length=1)


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
    with pytest.raises(ConfigError, match=r"no column 'text' \(data.train.field\)"):
        text_files(str(tmp_path / "b.parquet"))
    with pytest.raises(ConfigError, match=r"^data\.train\.paths: '.*nothing\*\.jsonl' matches no"):
        text_files(str(tmp_path / "nothing*.jsonl"))


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


GOOD = {"key": "g", "text": "a good document"}


def test_empty_documents_in_files_are_left_out_with_a_warning_naming_them(tmp_path, caplog):
    records = [{"text": "hello world"}, {"text": ""}, {"text": "   "}, {"text": "more"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "parts.txt").write_text("one\n\n\n\ntwo\n\n")  # blank pieces: no warning
    with caplog.at_level("WARNING", logger="grass_dist.data.text"):
        ds = text_files([str(tmp_path / "*")], separator="\n\n")
    assert ds.keys == ["d.jsonl:0", "d.jsonl:3", "parts.txt:0", "parts.txt:2"]
    assert ds.skipped_records == 0  # empty is not bad
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [
        "left out 3 empty or blank document(s) of data.train (no token to predict): "
        "d.jsonl:1, d.jsonl:2, empty.txt"
    ]


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"key": "x", "body": "no text field"}, r"has no data.train.field='text' \(its fields"),
        ({"key": "x", "text": None}, r"has data.train.field='text' = null, not a string"),
        ({"key": "x", "text": 7}, r"has data.train.field='text' = int 7, not a string"),
        ({"key": "x", "text": ["a", "b"]}, r"has data.train.field='text' = list \['a', 'b'\]"),
    ],
)
def test_a_jsonl_record_without_its_text_is_refused_with_file_line_and_field(tmp_path, bad, why):
    # Line 1 is good, line 2 blank (not a record), line 3 is the bad record.
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(BadRecordError, match=rf"corpus.jsonl, line 3 {why}") as info:
        text_files(str(path))
    assert "data.train.on_bad_record=skip" in str(info.value)
    assert isinstance(info.value, ConfigError)  # the jobs exit 2 on it
    skipped = text_files(str(path), on_bad_record="skip")
    assert skipped.keys == ["corpus.jsonl:0"] and skipped.skipped_records == 1


def test_lines_that_are_not_json_objects_are_bad_records(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "cut\n["a list"]\n{"text": "also fine"}\n')
    with pytest.raises(BadRecordError, match=r"c.jsonl, line 2 is not valid JSON"):
        text_files(str(path))
    ds = text_files(str(path), on_bad_record="skip")
    # Default keys count records, so the good ones keep the keys they had.
    assert ds.keys == ["c.jsonl:0", "c.jsonl:3"] and ds.skipped_records == 2


def test_parquet_nulls_non_strings_and_bad_keys(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["one", None, "three"], "id": ["a", "b", "c"]}), path)
    with pytest.raises(BadRecordError, match=r"p.parquet, row 1 has data.train.field='text' = nul"):
        text_files(str(path), key_field="id")
    assert text_files(str(path), key_field="id", on_bad_record="skip").keys == ["a", "c"]

    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(BadRecordError, match=r"row 0 has data.train.field='text' = int 1"):
        text_files(str(path))

    pq.write_table(pa.table({"text": ["one", "two", "three"], "id": ["a", None, "a"]}), path)
    with pytest.raises(BadRecordError, match=r"row 1 has data.train.key_field='id' = null"):
        text_files(str(path), key_field="id")
    with pytest.raises(ConfigError, match=r"no column 'nope' \(data.train.key_field\)"):
        text_files(str(path), key_field="nope")
    ds = text_files(str(path), key_field="id", on_bad_record="skip")
    assert ds.keys == ["a"] and ds.skipped_records == 2  # the null key and the repeated one

    pq.write_table(pa.table({"text": ["one", "two"], "id": [5, 5]}), path)  # integer ids
    with pytest.raises(BadRecordError, match=r"row 1 has data.train.key_field='id' = '5', already"):
        text_files(str(path), key_field="id")
    with pytest.raises(ConfigError, match="data.train.on_bad_record='ignore'"):
        text_files(str(path), on_bad_record="ignore")


def test_query_records_without_a_completion_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(BadRecordError, match=r"q.jsonl, line 2 has no data.query.completion_field"):
        prompts(path=path)
    with pytest.raises(BadRecordError, match=r"data.query.items\[1\].completion is None"):
        prompts(items=[{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}])
    with pytest.raises(ConfigError, match=r"^data\.query\.path: '.*nope\.jsonl' matches no local"):
        prompts(path=str(tmp_path / "nope.jsonl"))


def test_jobs_index_exits_2_on_a_bad_record_before_any_gradient(tmp_path):
    pytest.importorskip("transformers")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "one doc"}, {"key": "x", "b": "y"}])
    queries = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "one ", "completion": "doc"}])
    out = tmp_path / "out"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.index",
            "+example=tiny_gpt2",
            "model=hf_causal_lm",  # random weights from a config: nothing is trained
            "data=text_files",
            f"data.train.paths=[{corpus}]",
            f"data.query.path={queries}",
            f"run.output_dir={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "corpus.jsonl, line 2 has no data.train.field='text'" in run.stderr
    assert not (out / "index-tiny_gpt2").exists()  # refused before the index was created


def test_skipped_records_reach_the_job(tmp_path):
    # on_bad_record=skip: the job knows how many records it left out (its summary says so).
    pytest.importorskip("transformers")
    from grass_dist import pipeline
    from tests.conftest import compose_cfg

    corpus = write_jsonl(
        tmp_path / "corpus.jsonl", [{"text": "one doc"}, {"b": "y"}, {"text": None}]
    )
    queries = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "one ", "completion": "doc"}])
    cfg = compose_cfg(
        tmp_path,
        "+example=tiny_gpt2",
        "model=hf_causal_lm",
        "data=text_files",
        f"data.train.paths=[{corpus}]",
        f"data.query.path={queries}",
        "data.train.on_bad_record=skip",
        small=False,
    )
    job = pipeline.prepare(cfg)
    assert (job.n_train, job.skipped_records) == (1, 2)


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


def test_prompts_from_items_and_files(tmp_path, monkeypatch):
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
    # Keys name the file as training documents' do, not by the path as given: the same
    # from another working folder or with a relative path.
    assert from_file.keys[:2] == ["q.jsonl:0/t0", "q.jsonl:0/t1"]
    monkeypatch.chdir(tmp_path)
    relative = prompts(path="q.jsonl", prompt_field="p", completion_field="c", per_token=True)
    assert relative.keys == from_file.keys
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
