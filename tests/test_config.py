"""Every shipped preset composes and builds; bad input fails before Ray or any gradient."""

import subprocess
import sys

import pytest
import ray
import torch

from grass_dist import pipeline
from grass_dist.build import (
    build_dataset,
    build_layer_compressors,
    build_model,
    build_task,
    check_weights,
    locate_target,
)
from grass_dist.config import JobConfig
from grass_dist.errors import ConfigError, FingerprintMismatchError
from tests.conftest import CONF, ROOT, compose_cfg

# The language-model presets only build together (model, tokenizer and data must agree);
# tests/test_lm.py::test_lm_presets_compose_and_build builds them.
LM_PRESETS = {
    ("example", "tiny_gpt2"),
    ("model", "tiny_gpt2"),
    ("model", "hf_causal_lm"),
    ("data", "pydoc_topics"),
    ("data", "text_files"),
}
PRESETS = sorted(
    (group.name, f.stem)
    for group in CONF.iterdir()
    if group.is_dir()
    for f in group.glob("*.yaml")
    if (group.name, f.stem) not in LM_PRESETS
)


@pytest.mark.parametrize(("group", "option"), [p for p in PRESETS if p[0] != "compression"])
def test_every_preset_composes_and_instantiates(tmp_path, group, option):
    # Compression presets: tests/test_compression_presets.py (learned ones need a fit).
    if option == "custom":  # the user names their own callable: refused until they do
        _custom_preset_needs_a_target(tmp_path, group)
        return
    if group == "model":  # the small preset's overrides are the MLP's
        cfg = compose_cfg(tmp_path, f"model={option}", "model.epochs=2", small=False)
    else:
        cfg = compose_cfg(tmp_path, f"{group}={option}")
    job = JobConfig.from_cfg(cfg)
    model = build_model(job)
    build_task(job)
    assert len(build_dataset(job, "train")) > 0
    assert build_layer_compressors(job, model)


def _custom_preset_needs_a_target(tmp_path, group):
    # The digits model's sizes follow data.train's, which the custom data preset lacks.
    sizes = ("model.n_train=90", "model.n_query=12", "model.data_seed=0")
    job = JobConfig.from_cfg(
        compose_cfg(tmp_path, f"{group}=custom", *(sizes if group == "data" else ()), small=False)
    )
    build = {
        "model": build_model,
        "task": build_task,
        "data": lambda j: build_dataset(j, "train"),
    }[group]
    with pytest.raises(ConfigError, match=rf"{group}[.\w]*\._target_ is not set"):
        build(job)


def _fails_before_work(tmp_path, error, match, *overrides):
    with pytest.raises(error, match=match):
        pipeline.prepare(compose_cfg(tmp_path, *overrides))
    assert not ray.is_initialized()


def test_weights_with_nan_or_inf_are_refused_by_name_and_masks_of_inf_are_not():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model.register_buffer("mask", torch.full((2, 2), float("-inf")).triu(1))  # on purpose
    check_weights(model, "the model")
    with torch.no_grad():
        model[0].bias[2] = float("inf")
        model[1].running_var[0] = float("nan")
    model[0].weight.data = model[0].weight.data.half()
    model[0].weight.data[0, 0] = 60000.0  # finite, though a float16 sum of it overflows
    with pytest.raises(ConfigError) as refused:
        check_weights(model, "the model")
    assert str(refused.value) == (
        "the model has NaN or inf weights in 0.bias, 1.running_var (buffer): every loss and "
        "gradient it gives would be NaN or inf. Fix: load the checkpoint you mean to "
        "attribute (check the model's path), or check whether its training diverged (a loss "
        "that went NaN)"
    )
    many = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(7)))
    for layer in many:
        layer.weight.data.fill_(float("nan"))
    with pytest.raises(ConfigError, match=r"in 0\.weight, 1\.weight, .*, 4\.weight and 2 more: "):
        check_weights(many, "the model")


def test_unknown_layer_name(tmp_path):
    _fails_before_work(tmp_path, ConfigError, "index.layers names 'fc9'", "index.layers=[fc9]")


@pytest.mark.parametrize("k", [0, -3])
def test_non_positive_k(tmp_path, k):
    _fails_before_work(
        tmp_path, ConfigError, f"compression.k={k} must be a positive", f"compression.k={k}"
    )


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("run.output_dir=''", r"run\.output_dir is empty, which would put caches, logs and the "),
        ("cluster.driver_reduce_mib=-1", r"cluster\.driver_reduce_mib=-1\.0 must be >= 0 MiB"),
        (
            "+compression.overrides.fc9=grass",
            r"compression\.overrides\.fc9 names neither an attributed layer nor the kind of "
            r"one, so it would change nothing: the layers are \['fc1', 'out'\], of kinds",
        ),
    ],
)
def test_settings_that_were_taken_as_given_are_refused(tmp_path, override, said):
    # An empty run.output_dir wrote /logs and /cache at the root (as root).
    _fails_before_work(tmp_path, ConfigError, said, override)


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("task._target_=grass_dist.tasks.clasification", r"\(did you mean classification\?\)"),
        ("model._target_=grass_dist.models.digits_mpl", r"\(did you mean digits_mlp or "),
    ],
)
def test_a_misspelt_preset_target_is_told_the_near_names(tmp_path, override, said):
    # These packages resolve their names lazily: "it defines no public callable", before.
    _fails_before_work(tmp_path, ConfigError, said, override)


def test_an_unset_environment_variable_is_named_not_blamed_on_the_presets(tmp_path, monkeypatch):
    monkeypatch.delenv("GRASS_DIST_TEST_UNSET", raising=False)
    said = r"Environment variable 'GRASS_DIST_TEST_UNSET' not found\"\): set that variable in "
    with pytest.raises(ConfigError, match=said) as refused:
        pipeline.prepare(compose_cfg(tmp_path, "store.url=${oc.env:GRASS_DIST_TEST_UNSET}"))
    assert "presets" not in str(refused.value)


def test_k_larger_than_the_layer_with_whole_small_layers_off(tmp_path):
    _fails_before_work(
        tmp_path,
        ConfigError,
        r"compression.k=100000 is larger than layer 'fc1'.*whole_small_layers=true",
        "compression.k=100000",
        "++compression.whole_small_layers=false",
    )
    assert not (tmp_path / "index").exists()


def test_k_larger_than_every_layer_keeps_them_all_whole(tmp_path):
    job = pipeline.prepare(compose_cfg(tmp_path, "compression.k=100000"))
    assert job.whole_layers == ["fc1", "out"]
    assert {d["method"] for d in job.fingerprint["layers"]} == {"identity"}
    assert not ray.is_initialized()


def test_missing_target(tmp_path):
    _fails_before_work(
        tmp_path, ConfigError, r"'data.train' needs a '_target_'", "~data.train._target_"
    )


def test_a_target_that_cannot_be_imported_is_said_once(caplog):
    # Hydra logs its own ERROR before it raises: the user read the same failure twice.
    with pytest.raises(ConfigError, match=r"cannot be imported \(ModuleNotFoundError: No module"):
        locate_target({"_target_": "no_such_pkg.load"}, "model")
    assert not [r for r in caplog.records if r.name.startswith("hydra")]


def test_unknown_config_key(tmp_path):
    _fails_before_work(tmp_path, ConfigError, "config group 'compression'", "+compression.kk=3")


def test_a_store_url_inside_a_file_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    said = r"a_file, which is a file, not a folder. Fix: set store.url"
    _fails_before_work(tmp_path, ConfigError, said, f"store.url={blocker}/index")
    assert blocker.read_text() == "not a directory"


def test_query_set_with_a_different_model_is_refused(tmp_path):
    pipeline.prepare(compose_cfg(tmp_path))  # writes index.json, computes nothing
    with pytest.raises(FingerprintMismatchError, match="model"):
        pipeline.prepare(compose_cfg(tmp_path, "model.seed=1"), create_index=False)
    assert not ray.is_initialized()


def test_cli_prints_the_message_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.attribute", f"run.output_dir={tmp_path}", "compression.k=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: compression.k=0 must be a positive integer" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "given, said",
    [
        (
            {"aws_access_key_id": "AKIDGIVEN"},
            "store.storage_options.client_kwargs gives aws_access_key_id but not "
            "aws_secret_access_key: give both "
            "(+store.storage_options.client_kwargs.aws_secret_access_key=...) or neither (",
        ),
        (
            {"aws_secret_access_key": "SECRETGIVEN", "aws_session_token": "TOKENGIVEN"},
            "store.storage_options.client_kwargs gives aws_secret_access_key and "
            "aws_session_token but not aws_access_key_id: give aws_access_key_id, "
            "aws_secret_access_key and aws_session_token",
        ),
    ],
)
def test_half_a_credential_under_client_kwargs_is_refused_without_its_value(tmp_path, given, said):
    # s3fs hands client_kwargs to botocore, which takes credentials there too: half of one
    # fails as it does at the top level of storage_options, on the first request.
    cfg = compose_cfg(
        tmp_path,
        "store=s3",
        "store.url=s3://bucket/index",
        *(f"+store.storage_options.client_kwargs.{k}={v}" for k, v in given.items()),
    )
    with pytest.raises(ConfigError) as refused:
        JobConfig.from_cfg(cfg)
    assert str(refused.value).startswith(said)
    assert not any(value in str(refused.value) for value in given.values())
    whole = {"aws_access_key_id": "AKIDGIVEN", "aws_secret_access_key": "SECRETGIVEN"}
    cfg = compose_cfg(
        tmp_path,
        "store=s3",
        "store.url=s3://bucket/index",
        *(f"+store.storage_options.client_kwargs.{k}={v}" for k, v in whole.items()),
    )
    assert JobConfig.from_cfg(cfg).store.storage_options["client_kwargs"] == whole


def test_a_sweep_logs_under_the_output_dir_one_folder_per_job():
    # Unset, Hydra's sweep folder was ./multirun/<date>/<time>, outside run.output_dir.
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from grass_dist.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    assert sweep == {
        "dir": "${run.output_dir}/logs/${now:%Y-%m-%d_%H-%M-%S}-sweep",
        "subdir": "${hydra.job.num}",
    }
