"""The language-model example end to end on an embedded Ray, at a small size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from grass_dist import Client, pipeline, run
from grass_dist.build import build_dataset
from grass_dist.errors import ServiceError
from grass_dist.scoring import results
from grass_dist.service import app
from tests.conftest import compose_cfg
from tests.helpers import assert_answers_equal_topk_table
from tests.ray_procs import free_port

pytestmark = pytest.mark.integration

SMALL_LM = [
    "+example=tiny_gpt2",
    "data.train.n_docs=40",
    "data.train.max_length=64",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.steps=30",
    "model.batch_size=8",
    "index.shard_size=16",
    "task.batch_tokens=512",
    "cluster.cpus_per_worker=0.5",
    "compression.k=32",
    "scoring.dense=true",
    "scoring.topk=3",
]


def _cfg(tmp_path, name, *overrides):
    return compose_cfg(
        tmp_path / name, *SMALL_LM, f"model.cache_dir={tmp_path}/cache", *overrides, small=False
    )


def test_text_example_end_to_end_and_bfloat16_scores_track_float32(ray_session, tmp_path, capsys):
    summary = run.attribute(_cfg(tmp_path, "f32"))
    assert summary["index"]["rows"] == 40 and summary["score"]["queries"] == 6
    job32 = pipeline.prepare(_cfg(tmp_path, "f32"), create_index=False)
    train = build_dataset(job32.cfg, "train")
    topk = results.load_table(job32.index, "tiny_gpt2", "topk").to_pandas()
    best = topk[(topk["kind"] == "proponent")].sort_values(["query_row", "rank"])
    assert sorted(best["query_key"].unique()) == ["dict", "for", "lambda", "try", "while", "with"]
    assert set(best["train_key"]) <= set(train.keys)
    html = Path(summary["report"]["report"]).read_text(encoding="utf-8")
    assert "⟦iterate over the elements of a sequence⟧" in html
    top = best[best["query_key"] == "for"].iloc[0]
    shown = train.describe(int(top["train_row"]))["text"][:40]
    assert shown.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;") in html

    # The service answers the queries, sent as token ids (any length), as the batch job did.
    serve = _cfg(tmp_path, "f32", f"serve.port={free_port()}", "serve.cpus_per_replica=0.5")
    url = app.start(OmegaConf.to_container(serve, resolve=True))
    try:
        query = build_dataset(job32.cfg, "query")
        assert len({len(query[i]["input_ids"]) for i in range(6)}) > 1
        client = Client(url)
        answers = client.query([query[i] for i in range(6)], topk=3)  # tensors, as base64
        as_lists = [{k: v.tolist() for k, v in query[i].items()} for i in range(6)]
        assert client.query(as_lists, topk=3) == answers
        with pytest.raises(ServiceError, match=r"labels: no token after the first has a label"):
            client.query([{**as_lists[0], "labels": [-100] * len(as_lists[0]["labels"])}])
        with pytest.raises(ServiceError, match=r"fields \['input_ids'\] and optionally"):
            client.query([{"text": "for x in y"}])
    finally:
        app.stop()
    assert_answers_equal_topk_table(answers, topk)

    # damping=auto has nothing to choose by for a language model: say so, not "run jobs.lds".
    auto = _cfg(tmp_path, "f32", "precondition.damping=auto", "run.name=auto")
    with pytest.raises(SystemExit, match="2"):
        run.score(auto)
    assert "a language model (task causal_lm) has neither" in capsys.readouterr().err

    bf16 = _cfg(tmp_path, "bf16", "model.dtype=bfloat16", "cluster.num_workers=1")
    run.attribute(bf16)
    job16 = pipeline.prepare(bf16, create_index=False)
    assert job16.fingerprint["model"]["state_sha256"] != job32.fingerprint["model"]["state_sha256"]
    dense32 = results.load_dense(job32.index, "tiny_gpt2")
    dense16 = results.load_dense(job16.index, "tiny_gpt2")
    assert dense16.shape == dense32.shape == (40, 6) and np.isfinite(dense16).all()
    corr = np.corrcoef(dense16.ravel(), dense32.ravel())[0, 1]
    print(f"bfloat16 vs float32 influence scores: Pearson r = {corr:.4f}")
    assert corr > 0.9
