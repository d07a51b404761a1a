"""docs/language_models.md's Python example as a user runs it: their own GPT-2 and tokenizer
saved with `save_pretrained`, their own JSONL documents, a script in their own folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.helpers import bpe_tokenizer

# Appended to the example: a query copied from a training document (its first half the
# prompt, the rest the completion) must find that document first.
CHECK = """
copy = min((d for d in docs if 150 <= len(d["text"]) <= 250), key=lambda d: d["id"])
cut = len(copy["text"]) // 2
check = PromptDataset(
    ["copy"], [copy["text"][:cut]], [copy["text"][cut:]], tokenizer="/models/my_lm", max_length=128
)
top = index.attribute(check, damping=0.1, topk=1, name="check").topk()
best = top[top["kind"] == "proponent"]["train_key"].tolist()
assert best == [copy["id"]], (best, copy["id"])
print("copy found:", best)
"""


def docs_snippet() -> str:
    text = (ROOT / "docs" / "language_models.md").read_text()
    return re.search(r"^```python\n(.*?)^```", text, flags=re.M | re.S).group(1)


@pytest.mark.integration
def test_the_python_example_attributes_a_users_own_model(tmp_path):
    pytest.importorskip("transformers")
    from grass_dist.data.text import pydoc_documents
    from grass_dist.models.hf import hf_causal_lm

    keys, texts = pydoc_documents()
    picked = [i for i, k in enumerate(keys) if k.split("/")[1] in {"for", "lambda", "while"}]
    picked += list(range(0, len(keys), len(keys) // 60))
    docs = [{"id": keys[i], "text": texts[i]} for i in sorted(set(picked))]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tok = bpe_tokenizer([d["text"] for d in docs], vocab_size=400)
    config = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 128, "vocab_size": len(tok)}
    config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    where = tmp_path / "models" / "my_lm"
    hf_causal_lm("gpt2", config).save_pretrained(where)
    tok.save_pretrained(where)
    script = (docs_snippet() + CHECK).replace("/models/my_lm", str(where))
    (tmp_path / "attribute_lm.py").write_text(script)
    run = subprocess.run(
        [sys.executable, "attribute_lm.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "copy found:" in run.stdout
    printed = run.stdout.partition("copy found:")[0]
    assert re.search(r"\bfor\b.*pydoc/", printed) and re.search(r"\blambda\b.*pydoc/", printed)
    assert (tmp_path / "outputs" / "index-my_lm-api" / "index.json").is_file()
