"""On Ray: LDS ground truth is built once, damping=auto picks delta from the saved
eigendecomposition, jobs.lds evaluates dense scores, ensembles average their members."""

import numpy as np
import pytest
from omegaconf import OmegaConf

from grass_dist import pipeline, run
from grass_dist.build import build_dataset, build_task
from grass_dist.config import JobConfig
from grass_dist.errors import IndexNotFoundError
from grass_dist.fidelity import evaluate, ground_truth
from grass_dist.fidelity.metric import lds
from grass_dist.index import GradientIndex, Store
from grass_dist.models.digits import train_on
from grass_dist.runtime import executors
from grass_dist.scoring import results
from grass_dist.scoring.results import ArtifactDir
from tests.conftest import compose_cfg

pytestmark = pytest.mark.integration

LDS = ["lds.subsets=6", "lds.seeds=2", "lds.cpus_per_task=2", "lds.bootstrap=50"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fidelity")


def _raw(root, *overrides):
    cfg = compose_cfg(root, *LDS, *overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def test_ground_truth_is_built_once_from_retrained_models(ray_session, root, monkeypatch):
    raw = _raw(root)
    job = JobConfig.from_cfg(raw)
    gt, built = ground_truth.ensure(job, raw)
    assert built and gt.masks.shape == (6, 90) and gt.y.shape == (6, 12)
    assert (gt.masks.sum(1) == 45).all() and gt.y_seeds.shape == (2, 6, 12)
    # Subset 0, both seeds, retrained here: their mean is y_0.
    rows = np.flatnonzero(gt.masks[0])
    query, task = build_dataset(job, "query"), build_task(job)
    want = np.mean(
        [
            ground_truth.model_outputs(
                train_on(job.model, rows, ground_truth.training_seed(0, 0, r)),
                task,
                query,
                "logprob",
            )
            for r in range(2)
        ],
        axis=0,
    )
    np.testing.assert_allclose(gt.y[0], want, rtol=1e-6)
    assert (gt.y < 0).all()  # log-probabilities

    def no_training(*args, **kwargs):
        raise AssertionError("ground truth was retrained")

    monkeypatch.setattr(ground_truth, "build", no_training)
    again, built = ground_truth.ensure(job, raw)
    assert not built and again.digest == gt.digest
    np.testing.assert_array_equal(again.y, gt.y)
    np.testing.assert_array_equal(again.masks, gt.masks)


def test_ensemble_with_auto_damping_by_lds_and_no_second_gradient_pass(
    ray_session, root, monkeypatch, caplog
):
    calls = {"run_index": 0, "query_phi": 0, "run_precondition": 0}
    for name in calls:
        real = getattr(pipeline, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(pipeline, name, counted)
    url = f"{root}/ensemble"
    grid = "precondition.grid=[1e-4,1e-2,1,100]"
    raw = _raw(root, "ensemble.size=2", f"index.url={url}", "precondition.damping=auto", grid)
    caplog.set_level("INFO", logger="grass_dist.fidelity.damping")
    summary = run.attribute(OmegaConf.create(raw))
    # It says which ground truth it chose by.
    where = ground_truth.location(JobConfig.from_cfg(OmegaConf.create(raw)))
    assert f"damping=auto: choosing by LDS on the ground truth at {where}" in caplog.text
    # One gradient pass per member; every delta of the grid came from the saved factors.
    assert calls == {"run_index": 2, "query_phi": 2, "run_precondition": 2}
    selection = summary["damping"]
    assert selection["objective"] == "lds" and selection["chosen"] in (1e-4, 1e-2, 1.0, 100.0)
    assert len(selection["values"]) == 4 and selection["validation_queries"] == 1
    assert all(m["score"]["damping"] == selection["chosen"] for m in summary["members"])

    members = [GradientIndex.open(f"{url}/ckpt_{c}") for c in range(2)]
    assert members[0].fingerprint["model"] != members[1].fingerprint["model"]  # seeds 0, 1
    dense = [results.load_dense(m, "default") for m in members]
    assert not np.allclose(dense[0], dense[1])
    # The averaged result set is read as README says, by the URL (there is no index.json).
    averaged = results.load_dense(url, "default")
    np.testing.assert_allclose(averaged, (dense[0] + dense[1]) / 2, rtol=1e-6)
    assert results.manifest(url, "default")["summary"]["damping_selection"] == selection
    assert (
        len(results.load_table(url, "default", "topk"))
        == 2 * averaged.shape[1] * raw["scoring"]["topk"]
    )
    with pytest.raises(IndexNotFoundError, match=r"ensemble's folder.*ckpt_0.*load_dense\(url"):
        GradientIndex.open(url)
    where = ArtifactDir(Store(url))

    # jobs.lds evaluates the averaged dense scores: equal to the metric on the dense matrix,
    # and its held-out LDS equals the one the selection reported from its streaming pass.
    out = evaluate.lds(OmegaConf.create(raw))
    assert not out["ground_truth"]["built_now"]
    gt = ground_truth.lookup(JobConfig.from_cfg(raw))
    direct = lds(averaged, gt.masks, gt.y, n_boot=0)
    evaluated = out["results"]["default"]
    assert evaluated["all_queries"]["lds"] == pytest.approx(direct.mean, abs=1e-9)
    assert evaluated["heldout_queries"]["lds"] == pytest.approx(
        selection["heldout"]["lds"], abs=1e-6
    )
    assert where.has_artifact("results/default/lds.json")


class NoTasks(dict):
    """executors._TASKS that refuses every map call sent to a Ray task."""

    def __getitem__(self, fresh_process):
        raise AssertionError("a map call was sent to a Ray task")


def test_auto_damping_without_ground_truth_uses_the_label_proxy(
    ray_session, root, monkeypatch, caplog
):
    # A 90-row index is reduced by the driver (cluster.driver_reduce_mib): its damping
    # sweep's eigendecomposition and streaming pass run there too, with no task process.
    monkeypatch.setattr(executors, "_TASKS", NoTasks())
    # Member 0 of the ensemble is the plain model (seed 0); lds.seed=7 has no ground truth.
    proxy = _raw(
        root,
        f"index.url={root}/ensemble/ckpt_0",
        "precondition.damping=auto",
        "precondition.grid=[1e-2,1]",
        "lds.seed=7",
        "run.name=proxy",
    )
    caplog.set_level("INFO", logger="grass_dist.fidelity.damping")
    summary = run.score(OmegaConf.create(proxy))
    assert summary["damping"]["objective"] == "label_agreement@10"
    # It says where it looked: a ground truth built for other lds.* settings is elsewhere.
    where = ground_truth.location(JobConfig.from_cfg(proxy))
    assert f"no LDS ground truth at {where}, where `jobs.lds`" in caplog.text
    assert summary["damping"]["chosen"] in (1e-2, 1.0)
    assert 0 <= summary["damping"]["heldout"]["label_agreement@10"] <= 1
    index = GradientIndex.open(f"{root}/ensemble/ckpt_0")
    assert results.manifest(index, "proxy")["summary"]["damping"] == summary["damping"]["chosen"]
