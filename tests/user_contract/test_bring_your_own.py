"""README's "Bring your own model and data" commands, run literally with a user's package.

The commands are parsed from README.md's own fenced blocks of that section, so the
documentation cannot drift from what is tested; only the checkpoint `$PWD/ckpt.pt` (which
the shell would expand) is replaced by the user's real checkpoint. README's own listing of
that package runs as written in test_readme_package.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex

import pytest
from omegaconf import OmegaConf

from grass_dist.build import build_dataset, build_model
from grass_dist.config import JobConfig
from grass_dist.errors import ConfigError
from grass_dist.index import GradientIndex
from grass_dist.scoring.results import load_dense, load_table
from tests.conftest import compose_cfg
from tests.user_contract.conftest import ROOT, run_job
from tests.user_contract.test_bad_input import _overrides

pytestmark = pytest.mark.integration

SECTION = "## Bring your own model and data (config only)"
CHECKPOINT = "$PWD/ckpt.pt"


def readme_commands() -> list[tuple[str, list[str]]]:
    """(job, overrides) of every `python -m jobs.<job>` line in the section's bash blocks."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.find("\n## ", len(SECTION))]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["python", "-m"] and words[2].startswith("jobs."):
                commands.append((words[2].removeprefix("jobs."), words[3:]))
    return commands


def _summary(stdout: str) -> dict:
    """The JSON summary a job prints, alone on stdout (README: `| jq .index`)."""
    return json.loads(stdout)


def test_readme_commands_run_with_the_users_model_data_task_and_recipe(user_pkg, tmp_path):
    commands = readme_commands()
    assert [job for job, _ in commands] == ["attribute", "lds"]
    summaries = {}
    for job, overrides in commands:
        overrides = [o.replace(f"={CHECKPOINT}", f"={user_pkg.checkpoint}") for o in overrides]
        done = run_job(job, *overrides, user=user_pkg, cwd=tmp_path)
        assert done.returncode == 0, f"jobs.{job} failed:\n{done.stderr[-3000:]}"
        summaries[job] = _summary(done.stdout)
        # Ray's notice that it turned token auth on (with RAY_AUTH_MODE unset, as in a
        # user's shell) is noise for the embedded Ray: no job prints it.
        assert "RAY_AUTH_MODE" in os.environ or "RAY_AUTH_MODE=disabled" not in done.stderr
    # my_pkg.data.train_set() has 120 rows and queries() 10 (the callables' defaults).
    attributed = summaries["attribute"]
    assert attributed["index"]["rows"] == 120 and attributed["score"]["queries"] == 10
    # The user's task has no `predict`: agreement over every query, none over correct ones.
    assert 0 <= attributed["report"]["top_proponent_label_agreement"] <= 1
    assert attributed["report"]["top_proponent_label_agreement_correct"] is None
    index = GradientIndex.open(str(tmp_path / "outputs" / "index-mine"))
    assert load_dense(index, "default").shape == (120, 10)
    topk = load_table(index, "default", "topk").to_pandas()
    assert sorted(topk["query_row"].unique()) == list(range(10))
    ground_truth = summaries["lds"]["ground_truth"]
    assert ground_truth["built_now"] and ground_truth["queries"] == 10
    record = json.loads(
        (tmp_path / "outputs" / "index-mine" / "results" / "default" / "lds.json").read_text()
    )
    assert math.isfinite(record["all_queries"]["lds"])
    assert record["ground_truth"] == ground_truth["digest"]


def test_stdout_holds_the_summary_alone_when_a_worker_dies_and_the_model_prints(user_pkg, tmp_path):
    # Ray forwards what its processes print to the driver's stdout: "(raylet) A worker died
    # or was killed ..." when a worker is lost, a user's print() in a worker's model. The
    # job's stdout is for its summary (`| jq .index`), so that goes to stderr.
    overrides = [
        *_overrides(user_pkg, tmp_path),
        "model._target_=my_pkg.models.chatty",
        "cluster.driver_shard=false",
        "faults.kill_worker_after_rows=40",
    ]
    done = run_job("index", *overrides, user=user_pkg, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["index"]["rows"] == 90
    assert "A worker died or was killed" in done.stderr  # said, where logs go
    assert "forward of a batch of" in done.stderr


@pytest.mark.parametrize("logging", ["disabled", "none"])
def test_hydras_own_logging_presets_replace_ours_whole(user_pkg, tmp_path, logging):
    # Our console logs to stderr; Hydra's other presets (hydra/job_logging=disabled: no log
    # line) replace that whole, and the job runs as before (it crashed in Hydra's logging
    # setup with a console handler of ours without its class).
    done = run_job(
        "index", *_overrides(user_pkg, tmp_path), f"hydra/job_logging={logging}",
        user=user_pkg, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["index"]["rows"] == 90
    assert "[INFO]" not in done.stderr and "Traceback" not in done.stderr
    assert not list((tmp_path / "outputs" / "logs").glob("*/index.log"))  # nor a log file


def test_a_one_worker_job_on_this_machine_starts_no_worker_process_and_no_ray(user_pkg, tmp_path):
    # cluster.num_workers=1 on the embedded Ray: the driver indexes every shard; a worker
    # would only have competed for its CPUs while it started, and so would Ray's processes
    # (the job waited for Ray's start after its last commit).
    done = run_job("index", *_overrides(user_pkg, tmp_path), user=user_pkg, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["index"]["driver_shards"] == summary["index"]["computed_shards"] > 1
    assert "first_worker" not in summary["startup_seconds"]
    assert "ray" not in summary["startup_seconds"]
    assert "worker actors" not in done.stderr and "starting worker" not in done.stderr
    assert "embedded Ray" not in done.stderr


def test_a_one_worker_attribute_job_starts_no_ray_and_scores_as_jobs_with_ray(user_pkg, tmp_path):
    # Its driver indexes, differentiates the queries (12 rows: three chunks) and reduces the
    # small index itself: Ray's start (about 3 CPU-seconds) only took CPUs from it. A
    # reducer too large for the driver asks for Ray (the main thread starts it then); and
    # two workers start it at once. The scores are the same, to the bit, every way.
    def attribute(name: str, *overrides: str) -> tuple[dict, str, dict]:
        given = _overrides(user_pkg, tmp_path / name, "index.shard_size=5", *overrides)
        done = run_job("attribute", *given, user=user_pkg, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        index = GradientIndex.open(str(tmp_path / name / "index"))
        tables = ("topk", "self_influence")
        return (
            json.loads(done.stdout),
            done.stderr,
            {t: load_table(index, "default", t).to_pandas() for t in tables},
        )

    alone, said, scores = attribute("alone")
    assert "ray" not in alone["startup_seconds"] and "embedded Ray" not in said
    assert "query gradients: 12 rows, computed by the driver" in said
    assert "the driver reduces the index itself" in said
    said = {}
    for name, override in [("reducer", "cluster.driver_reduce_mib=0"),
                           ("workers", "cluster.num_workers=2")]:  # fmt: skip
        _, said[name], theirs = attribute(name, override)
        assert "started an embedded Ray" in said[name], said[name][-3000:]
        for table, want in scores.items():
            got = theirs[table]
            assert got.shape == want.shape and (got.values == want.values).all(), (name, table)
    assert "starting reducer 1" in said["reducer"]  # an actor, on the Ray it asked for
    assert "computed by the driver" not in said["workers"]  # the workers' queries


_DRIVER_GIVES_BACK = """
import grass_dist.runtime.local_shard as local_shard

def _failed(*args, **kwargs):  # the driver's process fails, not its rows
    raise OSError("the driver's shard failed (test)")

local_shard.index_rows = _failed
"""


def test_a_one_worker_job_starts_ray_and_a_worker_for_shards_the_driver_gives_back(
    user_pkg, tmp_path
):
    # The driver indexing alone starts no Ray; a shard it gives back (a failure of its
    # process's own) needs a worker: the job's thread asks, the main thread starts Ray (its
    # processes die with the thread that starts them), a worker computes every shard.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_DRIVER_GIVES_BACK)
    env = user_pkg.env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(hook)])
    done = run_job("index", *_overrides(user_pkg, tmp_path), user=user_pkg, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["index"]["driver_shards"] == 0 and summary["index"]["rows"] == 90
    assert {"ray", "first_worker"} <= set(summary["startup_seconds"])
    assert "started an embedded Ray" in done.stderr and "Traceback" not in done.stderr
    assert len(GradientIndex.open(str(tmp_path / "index")).committed()) > 1


def test_a_leftover_preset_argument_stops_the_job_naming_it_and_its_removal(user_pkg, tmp_path):
    # README's old command: only _target_ overridden, so model=digits_mlp's arguments stay.
    done = run_job(
        "index",
        "model._target_=my_pkg.models.load",
        f"+model.path={user_pkg.checkpoint}",
        user=user_pkg,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "model._target_=my_pkg.models.load takes no argument epochs" in done.stderr
    assert "the preset model=digits_mlp" in done.stderr and "also hidden" in done.stderr
    assert "Select model=custom" in done.stderr and "~model.epochs" in done.stderr
    assert not (tmp_path / "outputs" / "index").exists()  # refused before anything was written


def test_a_leftover_data_argument_names_the_data_override(tmp_path):
    target = "data.train._target_=tests.user_contract.test_bring_your_own.train_set"
    job = JobConfig.from_cfg(compose_cfg(tmp_path, target, small=False))
    with pytest.raises(
        ConfigError,
        match=r"takes no argument split, n_train, n_query, seed \(it takes: n\)\. .*"
        r"Select data=custom .* ~data\.train\.split",
    ):
        build_dataset(job, "train")


def train_set(n=120):
    """A user's dataset callable taking its own arguments, not the digits preset's."""
    return list(range(n))


def test_a_group_chosen_on_the_command_line_wins_over_an_examples(tmp_path):
    # README: `+example=tiny_gpt2 model=custom model._target_=...` keeps the example's data
    # and task for the user's own model, with none of the example model's arguments.
    cfg = compose_cfg(
        tmp_path, "+example=tiny_gpt2", "model=custom", "model._target_=my_pkg.lm.load", small=False
    )
    assert dict(cfg.model) == {"_target_": "my_pkg.lm.load"}
    assert cfg.data.train._target_ == "grass_dist.data.text.pydoc_topics"
    assert cfg.task._target_ == "grass_dist.tasks_lm.causal_lm"


def test_custom_presets_hold_only_an_unset_target(tmp_path):
    cfg = compose_cfg(tmp_path, "model=custom", "data=custom", "task=custom", small=False)
    nodes = {"model": cfg.model, "train": cfg.data.train, "query": cfg.data.query, "task": cfg.task}
    for name, node in nodes.items():
        assert OmegaConf.to_container(node) == {"_target_": "???"}, name
    job = JobConfig.from_cfg(cfg)
    with pytest.raises(ConfigError, match=r"model._target_ is not set: .*model._target_=my_pkg"):
        build_model(job)


def test_an_index_job_needs_no_queries_and_a_scoring_job_says_so_before_ray(
    user_pkg, tmp_path, monkeypatch, capsys
):
    # data=custom leaves data.query._target_ unset: `jobs.index` builds only the index and
    # reads no queries; `jobs.attribute` refuses naming the field, before Ray starts.
    import ray

    from grass_dist import pipeline
    from jobs import attribute

    monkeypatch.syspath_prepend(str(user_pkg.root))
    given = (
        "model=custom",
        "model._target_=my_pkg.models.load",
        f"+model.path={user_pkg.checkpoint}",
        "data=custom",
        "data.train._target_=my_pkg.data.train_set",
        f"store.url={tmp_path / 'index'}",
        f"run.output_dir={tmp_path}",
    )
    job = pipeline.prepare(compose_cfg(tmp_path, *given, small=False))
    assert job.n_train == 120
    with pytest.raises(SystemExit) as exited:
        attribute.main(compose_cfg(tmp_path, *given, small=False))
    assert exited.value.code == 2 and not ray.is_initialized()
    assert "error: data.query._target_ is not set" in capsys.readouterr().err
