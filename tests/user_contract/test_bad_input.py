"""Bad input is refused before Ray starts or any gradient is computed.

Each row of the table (bad_inputs.py) is one bad input (config, data, store or service)
given to a job's real entry point: the job must exit with status 2, print one paragraph
that names the field and the fix (no traceback), start no Ray, and leave the store as it
was. The rows call `jobs.<job>.main(cfg)` in this process (Hydra passes a composed config
straight through); test_bad_input_cli.py runs some as a user's shell would.

The rows name a running Ray cluster (`cluster.address`, a real head started once for the
module), which a job joins only after every check passed. With no address, the default, a
job that passes the config checks starts its embedded Ray beside the model, data and store
checks, and a refusal there waits for that start (seconds) to stop it: a few rows of each
kind of check run that way too (EMBEDDED).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import ray
import torch
from hydra.errors import ConfigCompositionException

from grass_dist import pipeline
from tests.conftest import compose_cfg
from tests.ray_procs import isolated_ray_env
from tests.user_contract.bad_inputs import CASES, EMBEDDED, USER, USER_MODEL


@pytest.fixture(scope="module")
def head():
    """The address of a running Ray cluster (its head only) that the rows may name."""
    from ray.cluster_utils import Cluster

    with isolated_ray_env():
        cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
        )
        try:
            yield cluster.address
        finally:
            cluster.shutdown()


def _snapshot(root: Path) -> dict[str, bytes] | None:
    """Every file under `root` with its bytes (None when `root` does not exist)."""
    if not root.exists():
        return None
    if root.is_file():
        return {"": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _overrides(user, case: Path, *overrides: str) -> list[str]:
    """USER, the row's own store under `case`, then the row's overrides."""
    given = (*USER, f"store.url={case / 'index'}", *overrides)
    return [o.replace("{case}", str(case)).replace("{ckpt}", str(user.checkpoint)) for o in given]


def _message(stderr: str) -> str:
    """The error paragraph: stderr from its last line that starts with 'error: ' to the end,
    without a blank line (so nothing, not even a log line, is printed after it)."""
    assert "Traceback" not in stderr
    lines = stderr.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert starts, stderr[-3000:]
    paragraph = lines[starts[-1] :]
    assert all(line.strip() for line in paragraph), stderr[-3000:]
    return "\n".join(paragraph)


def _refused(job: str, cfg, capsys) -> str:
    """Run `jobs.<job>` on a composed config; it must exit 2. Returns its error paragraph."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(f"jobs.{job}").main(cfg)
    assert exited.value.code == 2
    return _message(capsys.readouterr().err)


@pytest.mark.parametrize(("job", "given", "match"), CASES.values(), ids=CASES.keys())
def test_bad_input_exits_2_before_ray_and_writes_nothing(
    tmp_path, user_pkg, monkeypatch, capsys, head, job, given, match
):
    given = (f"cluster.address={head}", *given)
    _exits_2_and_writes_nothing(tmp_path, user_pkg, monkeypatch, capsys, job, given, match)


@pytest.mark.parametrize(("job", "given", "match"), [CASES[row] for row in EMBEDDED], ids=EMBEDDED)
def test_bad_input_exits_2_while_the_embedded_ray_starts_and_writes_nothing(
    tmp_path, user_pkg, monkeypatch, capsys, job, given, match
):
    _exits_2_and_writes_nothing(tmp_path, user_pkg, monkeypatch, capsys, job, given, match)


@pytest.mark.parametrize(
    ("given", "match"),
    [
        (
            ("cluster.cpus_per_worker=64",),
            r"cluster\.cpus_per_worker=64 asks each worker for 64 CPU",
        ),
        (
            ("cluster.worker_resources={slot:1}",),
            r"cluster\.worker_resources\.slot=1 asks .* \(0\)",
        ),
    ],
    ids=["cpus", "custom"],
)
def test_workers_the_embedded_ray_could_never_place_are_refused_before_it_starts(
    tmp_path, user_pkg, monkeypatch, capsys, given, match
):
    # Its CPUs are known before it starts (cluster.num_cpus, else the machine's), and it has
    # no custom resource: refused then, with no index created and no Ray started.
    _exits_2_and_writes_nothing(tmp_path, user_pkg, monkeypatch, capsys, "index", given, match)


def _exits_2_and_writes_nothing(tmp_path, user_pkg, monkeypatch, capsys, job, given, match):
    monkeypatch.syspath_prepend(str(user_pkg.root))
    (tmp_path / "a_file").write_text("a file, not a folder")
    before = {p: _snapshot(p) for p in (tmp_path / "index", tmp_path / "a_file")}
    cfg = compose_cfg(tmp_path, *_overrides(user_pkg, tmp_path, *given), small=False)
    assert re.search(match, _refused(job, cfg, capsys), re.S)
    assert not ray.is_initialized()
    assert {p: _snapshot(p) for p in before} == before


def test_score_refuses_another_model_and_leaves_the_index_as_it_was(
    tmp_path, user_pkg, monkeypatch, capsys, head
):
    monkeypatch.syspath_prepend(str(user_pkg.root))
    store = tmp_path / "index"
    pipeline.prepare(compose_cfg(tmp_path, *_overrides(user_pkg, tmp_path), small=False))
    before = _snapshot(store)
    assert "index.json" in before  # prepare writes the fingerprint, computes nothing
    state = torch.load(user_pkg.checkpoint, weights_only=True)
    state["out.bias"] += 1.0  # the user retrained: another model
    torch.save(state, tmp_path / "retrained.pt")
    retrained = f"model.path={tmp_path / 'retrained.pt'}"
    given = _overrides(user_pkg, tmp_path, f"cluster.address={head}", retrained)
    message = _refused("score", compose_cfg(tmp_path, *given, small=False), capsys)
    assert re.search(r"error: the gradient index at .* different fingerprint", message)
    assert "model.state_sha256" in message
    assert not ray.is_initialized()
    assert _snapshot(store) == before


def test_a_malformed_text_record_is_refused_before_ray(
    tmp_path, user_pkg, monkeypatch, capsys, head
):
    monkeypatch.syspath_prepend(str(user_pkg.root))
    corpus, queries = tmp_path / "corpus.jsonl", tmp_path / "q.jsonl"
    corpus.write_text('{"text": "one doc"}\n{"txt": "a misspelt field"}\n')
    queries.write_text('{"prompt": "one ", "completion": "doc"}\n')
    given = (
        *USER_MODEL,
        "data=text_files",
        f"data.train.paths=[{corpus}]",
        f"data.query.path={queries}",
        f"store.url={tmp_path / 'index'}",
        f"cluster.address={head}",
    )
    cfg = compose_cfg(
        tmp_path, *(o.replace("{ckpt}", str(user_pkg.checkpoint)) for o in given), small=False
    )
    message = _refused("index", cfg, capsys)
    assert re.search(r"corpus\.jsonl, line 2 .*text.*data\.train\.on_bad_record=skip", message)
    assert not ray.is_initialized()
    assert not (tmp_path / "index").exists()


def test_hydra_refuses_a_value_of_the_wrong_type(tmp_path):
    # JobConfig is Hydra's schema (register_configs): the command line is type-checked
    # while composing, so the refusal names the override before any job code runs.
    with pytest.raises(ConfigCompositionException, match=r"compression\.k=many") as refused:
        compose_cfg(tmp_path, "compression.k=many", small=False)
    assert "could not be converted to Integer" in str(refused.value.__cause__)


def test_presets_that_do_not_fit_together_are_named(tmp_path, user_pkg, monkeypatch, capsys):
    # The digits model reads its sizes from the digits data preset, which data=custom lacks.
    monkeypatch.syspath_prepend(str(user_pkg.root))
    given = [o for o in _overrides(user_pkg, tmp_path) if o not in USER_MODEL]
    cfg = compose_cfg(tmp_path, *given, small=False)
    message = _refused("attribute", cfg, capsys)
    assert re.search(
        r"model\.n_train could not be resolved .*\(model=custom with data=custom; a language "
        r"model on your own text: model=hf_causal_lm with data=text_files",
        message,
    )
    assert not ray.is_initialized()
    assert not (tmp_path / "index").exists()


def test_lds_refuses_a_bad_recipe_before_ray_starts(tmp_path, user_pkg, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(user_pkg.root))
    given = _overrides(
        user_pkg, tmp_path, "+lds.train._target_=my_pkg.train.fit", "+lds.train.bogus=1"
    )
    message = _refused("lds", compose_cfg(tmp_path, *given, small=False), capsys)
    assert re.search(r"lds\.train.*bogus", message, re.S)
    assert not ray.is_initialized()
    assert not (tmp_path / "index").exists()
