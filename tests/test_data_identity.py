"""Data identity: an index can grow with data.train, but never take rows of another dataset."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from grass_dist import pipeline, run
from grass_dist.data import digits, items
from grass_dist.data.identity import (
    MarkChanged,
    changed_rows,
    check_committed_content,
    check_committed_rows,
    data_identity,
)
from grass_dist.errors import ConfigError, DataMismatchError
from grass_dist.gradients.computer import GradientComputer
from grass_dist.index import GradientIndex, ShardRecord
from grass_dist.index.content import row_digest, row_digests, shard_digest
from grass_dist.report import write_report
from grass_dist.tasks.language_model import CausalLMTask
from tests.conftest import ROOT, compose_cfg

NODE = {"_target_": "grass_dist.data.digits", "split": "train", "n_train": 90, "n_query": 12}


def test_identity_drops_only_declared_size_arguments():
    small = data_identity({**NODE, "seed": 0}, digits("train", 90, 12))
    grown = data_identity({**NODE, "n_train": 120, "seed": 0}, digits("train", 120, 12))
    assert small == grown == {"_target_": NODE["_target_"], "split": "train", "seed": 0}
    assert data_identity({**NODE, "seed": 1}, digits("train", 90, 12)) != small
    query = digits("query", 90, 12)  # its rows move with n_train: nothing is a size argument
    assert data_identity({**NODE, "split": "query"}, query) == {**NODE, "split": "query"}
    # Growing n_train only appends rows to the training split.
    assert digits("train", 120, 12).keys[:90] == digits("train", 90, 12).keys


class Rows:
    """A dataset of ``n`` rows with keys ``k<i>``, except ``changed`` rows."""

    def __init__(self, n: int, changed: dict[int, str] | None = None) -> None:
        self.keys = [(changed or {}).get(i, f"k{i}") for i in range(n)]

    def __len__(self) -> int:
        return len(self.keys)


def _index(tmp_path, n: int, shard: int) -> GradientIndex:
    index = GradientIndex.create_or_open(
        str(tmp_path / "idx"), {"layers": [{"name": "fc", "k": 1}]}
    )
    for lo in range(0, n, shard):
        rows = np.arange(lo, min(lo + shard, n))
        phi = {"fc": np.zeros((len(rows), 1), np.float32)}
        keys = [f"k{i}" for i in rows]
        index.commit([index.write_shard(f"s{lo:03d}", lo, rows[-1] + 1, rows, keys, phi)])
    return index


def test_committed_rows_allow_growth_and_refuse_shrinking_or_other_keys(tmp_path):
    index = _index(tmp_path, 50, 10)
    check_committed_rows(index, Rows(50))
    check_committed_rows(index, Rows(80))  # growth
    with pytest.raises(DataMismatchError, match="up to 49.*only 40 rows"):
        check_committed_rows(index, Rows(40))
    # Rows 0-9, 20-29 and 40-49 are sampled (first, middle, last shard).
    with pytest.raises(DataMismatchError, match="row 45 has key 'k45' in the index .* but 'x'"):
        check_committed_rows(index, Rows(60, {45: "x"}))
    check_committed_rows(index, Rows(60, {15: "x"}), shards=3)  # unsampled shard: not read
    with pytest.raises(DataMismatchError, match="row 15"):
        check_committed_rows(index, Rows(60, {15: "x"}), shards=5)


def test_unreadable_sampled_shard_is_skipped(tmp_path):
    index = _index(tmp_path, 30, 10)
    first = min(index.committed().values(), key=lambda r: r.start)
    index.store.write_bytes(first.file, b"not parquet")
    check_committed_rows(index, Rows(30, {5: "x"}))  # repair will report it instead
    with pytest.raises(DataMismatchError, match="row 25"):
        check_committed_rows(index, Rows(30, {25: "x"}))


# ---- content digests -------------------------------------------------------------------


def test_row_digest_is_canonical_and_sees_every_value():
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    item = {"input": x, "label": 3}
    assert row_digest(item) == row_digest({"label": 3, "input": x.clone()})  # key order
    assert row_digest(item) == row_digest({"input": x.numpy(), "label": 3})  # same array
    others = [
        {"input": x.double(), "label": 3},  # dtype
        {"input": x.reshape(3, 2), "label": 3},  # shape
        {"input": x, "label": 4},  # a scalar
        {"input": x, "label": "3"},  # a type
        (x, 3),
        [[1], 2],
        [1, [2]],
        {"input": torch.where(x == 4, -1.0, x), "label": 3},  # one element
    ]
    digests = {row_digest(v) for v in [item, *others]}
    assert len(digests) == 1 + len(others)
    assert row_digest(torch.ones(2, dtype=torch.bfloat16)) != row_digest(torch.ones(2))
    assert row_digest(torch.tensor(3)) != row_digest(torch.tensor([3]))
    assert row_digest(torch.ones(2, requires_grad=True)) == row_digest(np.ones(2, np.float32))
    assert len(row_digest("text")) == 32
    with pytest.raises(ConfigError, match="cannot digest a training item holding a object"):
        row_digest({"x": object()})


def _lm_items(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=gen).tolist()
    return [{"input_ids": torch.randint(1, 40, (m,), generator=gen)} for m in lengths]


def _loader(task: CausalLMTask) -> GradientComputer:
    """A worker's row loading (no layers: load_rows needs only the task)."""
    return GradientComputer(torch.nn.Linear(1, 1), task, {})


def test_row_digests_do_not_depend_on_batch_padding_or_worker():
    # Causal-LM rows of different lengths are right-padded into batches whose width depends
    # on their neighbours: the digest must see the example, not the batch.
    data = [{**it, "labels": it["input_ids"].clone()} for it in _lm_items(10)]
    one = _loader(CausalLMTask("sum", None)).load_rows(data, range(10), batch_size=3)
    other = _loader(CausalLMTask("sum", 16)).load_rows(data, range(4, 10), batch_size=8)
    widths = {batch["input_ids"].shape for _, batch in one.batches + other.batches}
    assert len(widths) > 2  # rows were padded to different widths
    assert one.digests.shape == (10, 32) and one.digests.dtype == np.uint8
    assert np.array_equal(one.digests[4:], other.digests)
    assert np.array_equal(one.digests, row_digests(data))
    assert len({d.tobytes() for d in one.digests}) == 10


class Items:
    """A dataset of ``n`` items with keys ``k<i>``; ``edits`` replaces rows' content only."""

    def __init__(self, n: int, edits: dict[int, torch.Tensor] | None = None) -> None:
        self.keys = [f"k{i}" for i in range(n)]
        self.edits = edits or {}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.edits.get(i, torch.full((4,), float(i))), i % 3


def _signed_index(tmp_path, data: Items, shard: int) -> GradientIndex:
    """An index of ``data`` as workers write it: row digests in the files and manifest."""
    index = GradientIndex.create_or_open(
        str(tmp_path / "idx"), {"layers": [{"name": "fc", "k": 1}]}
    )
    for lo in range(0, len(data), shard):
        rows = np.arange(lo, min(lo + shard, len(data)))
        digests = row_digests(data[int(r)] for r in rows)
        phi = {"fc": np.zeros((len(rows), 1), np.float32)}
        keys = [data.keys[r] for r in rows]
        record = index.write_shard(f"s{lo:03d}", lo, rows[-1] + 1, rows, keys, phi, digests)
        assert record.data_sha256 == shard_digest(digests)
        index.commit([record])
    return index


def test_a_row_edited_anywhere_is_refused_with_its_key(tmp_path):
    index = _signed_index(tmp_path, Items(50), 10)
    stored = index.read(min(index.committed().values(), key=lambda r: r.start), layers=[])
    assert np.array_equal(stored.digests, row_digests(Items(50)[i] for i in range(10)))
    check_committed_content(index, Items(50))
    check_committed_content(index, Items(80))  # appended rows are not committed yet
    edited = Items(60, {15: torch.full((4,), -1.0), 17: torch.zeros(4)})
    check_committed_rows(index, edited)  # same keys: the sampled key check cannot see it
    with pytest.raises(
        DataMismatchError,
        match=r"changed since .*: 1 of 5 committed shards hold rows whose content differs, "
        r"first row 15 \(key 'k15'\), row 17 \(key 'k17'\)\..*restore the training data",
    ):
        check_committed_content(index, edited)
    with pytest.raises(DataMismatchError, match=r"first row 49 \(key 'k49'\)\."):
        check_committed_content(index, Items(50, {49: torch.ones(5)}))


def test_shards_without_row_digests_are_named_by_range_or_skipped(tmp_path, caplog):
    index = _signed_index(tmp_path, Items(30), 10)
    middle = index.committed()["s010"]
    index.store.write_bytes(middle.file, b"not parquet")  # the manifest's digest still counts
    with pytest.raises(DataMismatchError, match=r"first rows 10\.\.19 \(shard s010\)\."):
        check_committed_content(index, Items(30, {12: torch.ones(4)}))
    _index(tmp_path / "old", 30, 10)  # written before content digests: nothing to compare
    old = GradientIndex.open(str(tmp_path / "old" / "idx"))
    assert all(r.data_sha256 == "" for r in old.committed().values())
    check_committed_content(old, Items(30, {12: torch.ones(4)}))
    assert "3 committed shards were written before content digests" in caplog.text


def test_the_report_marks_the_shown_rows_whose_content_changed(tmp_path):
    index = _signed_index(tmp_path, Items(30), 10)
    data = Items(28, {12: torch.ones(4), 25: torch.ones(4)})
    assert changed_rows(index, data, [3, 12, 12, 29, 40]) == [12, 29]  # 29: gone; 40: never indexed
    view = MarkChanged(data, [12])
    assert items.describe(view, 12) == {"key": "k12", "label": "?", "text": MarkChanged.NOTE}
    assert items.describe(view, 3) == items.describe(data, 3)
    html = write_report(None, _topk([3, 12]), view, Items(1))
    assert html.count(MarkChanged.NOTE) == 1 and "k3" in html


def test_a_score_job_checks_only_the_training_rows_its_report_shows(tmp_path, caplog):
    index = _signed_index(tmp_path, Items(30), 10)
    data = Items(30, {r: torch.ones(4) for r in (2, 5, 20, 21)})
    self_inf = pd.DataFrame({"train_row": range(30), "self_influence": np.arange(30.0)})
    # Shown: proponents 2 and 3, and the 8 highest self-influences, rows 22..29.
    assert run._changed_shown_rows(index, data, _topk([2, 3]), self_inf) == [2]
    assert "training rows [2] changed since the index" in caplog.text
    assert run._changed_shown_rows(index, data, _topk([5, 21]), None) == [5, 21]


def _topk(train_rows: list[int]) -> pd.DataFrame:
    """Query 0's proponents, in rank order."""
    n = len(train_rows)
    return pd.DataFrame(
        {
            "query_row": [0] * n,
            "query_key": ["q0"] * n,
            "rank": list(range(n)),
            "kind": ["proponent"] * n,
            "train_row": train_rows,
            "train_key": [f"k{r}" for r in train_rows],
            "score": [1.0 - 0.1 * r for r in range(n)],
        }
    )


def test_manifest_entries_written_before_content_digests_still_load():
    entry = {"shard_id": "s", "start": 0, "end": 2, "rows": 2, "file": "f", "sha256": "x"}
    record = ShardRecord.from_dict({**entry, "nbytes": 1, "attempt": "a"})
    assert record.data_sha256 == ""


LM_JOB = [
    "+example=tiny_gpt2",
    "model=hf_causal_lm",  # random weights from a config: nothing is trained
    "data=text_files",
    "index.shard_size=4",
    "compression.k=16",
    "cluster.num_workers=1",
]


def _write_jsonl(path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_an_index_only_job_needs_no_query_file(tmp_path):
    # data=text_files leaves data.query.path unset: jobs.index reads no queries, so it runs;
    # a job that scores them is refused with the override to add.
    pytest.importorskip("transformers")
    corpus = tmp_path / "corpus.jsonl"
    _write_jsonl(corpus, [{"text": f"document {i}"} for i in range(4)])
    cfg = compose_cfg(tmp_path / "out", *LM_JOB, f"data.train.paths=[{corpus}]", small=False)
    assert pipeline.prepare(cfg).n_train == 4
    with pytest.raises(ConfigError, match=r"add data\.query\.path=<value>"):
        pipeline.prepare(cfg, query=True)


def test_jobs_index_refuses_to_append_after_a_row_was_edited_in_place(ray_session, tmp_path):
    pytest.importorskip("transformers")
    docs = [{"text": f"document {i}: the {'quick' if i % 2 else 'lazy'} fox"} for i in range(12)]
    corpus, queries, out = tmp_path / "corpus.jsonl", tmp_path / "q.jsonl", tmp_path / "out"
    _write_jsonl(corpus, docs)
    _write_jsonl(queries, [{"prompt": "document 1: the ", "completion": "quick fox"}])
    data = [f"data.train.paths=[{corpus}]", f"data.query.path={queries}"]
    job = pipeline.prepare(compose_cfg(out, *LM_JOB, *data, small=False))
    try:
        assert pipeline.run_index(job)["computed_shards"] == 3
    finally:
        pipeline.shutdown(job)
    committed = job.index.committed()
    assert all(r.data_sha256 for r in committed.values())

    # Line 7 (row 6) changes in place, so its key stays; four documents are appended.
    edited = [*docs[:6], {"text": "document 6: the quick cat"}, *docs[7:]]
    more = [{"text": f"document {i}: a new fox"} for i in range(12, 16)]
    _write_jsonl(corpus, edited + more)
    run = subprocess.run(
        [sys.executable, "-m", "jobs.index", *LM_JOB, *data, f"run.output_dir={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert (
        "the training data changed since the gradient index at" in run.stderr
        and "1 of 3 committed shards hold rows whose content differs, first row 6 (key "
        "'corpus.jsonl:6#0')"
        in run.stderr
    ), run.stderr[-2000:]
    assert job.index.committed() == committed  # refused before any shard was added

    _write_jsonl(corpus, docs + more)  # the data restored: the same append is accepted
    assert pipeline.prepare(compose_cfg(out, *LM_JOB, *data, small=False)).n_train == 16
