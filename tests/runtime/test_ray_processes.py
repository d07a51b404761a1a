"""The attribution job on real Ray processes: `ray start` nodes and `ray job submit`; a
submission without the cluster's auth token is refused and runs nothing."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from grass_dist import pipeline
from grass_dist.build import build_dataset, build_layer_compressors, build_model, build_task
from grass_dist.gradients.computer import GradientComputer
from grass_dist.index import GradientIndex, Store
from grass_dist.runtime.progress import read_progress
from grass_dist.scoring import results
from tests.conftest import SMALL, compose_cfg
from tests.ray_procs import LocalRayCluster, running_in_groups

pytestmark = pytest.mark.integration


def _submit_without_the_token(cluster: LocalRayCluster, tmp_path) -> list:
    """`ray job submit` with no token (token auth off on the client), then a wrong one.

    HOME is an empty folder, so no ~/.ray/auth_token of this machine's user is found. The job
    would create `tmp_path/ran`.
    """
    home = tmp_path / "home"
    home.mkdir()
    base = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    base["HOME"] = str(home)
    wrong = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    job = ("python", "-c", f"open({str(tmp_path / 'ran')!r}, 'w')")
    return [cluster.submit(*job, timeout=120, env=env) for env in (base, wrong)]


def test_attribute_job_submitted_to_a_started_cluster(tmp_path):
    out = tmp_path / "out"
    args = [f"run.output_dir={out}", *SMALL, "cluster.num_workers=2"]
    with LocalRayCluster(tmp_path) as cluster:
        cluster.start_head()
        cluster.wait_for(nodes=1)  # workers join a head that answers
        cluster.add_worker(num_cpus=3)
        cluster.wait_for(nodes=2)
        refusals = _submit_without_the_token(cluster, tmp_path)
        done = cluster.submit("python", "-m", "jobs.attribute", "cluster.address=auto", *args)
        groups = [node.pid for node in cluster.nodes]
    for refused, why in zip(refusals, ("Missing", "Invalid"), strict=True):
        assert refused.returncode != 0, refused.stdout[-2000:]
        assert f"{why} authentication token" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "ran").exists(), "a job submitted without the token ran"
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "succeeded" in done.stdout
    assert not running_in_groups(groups), "ray processes outlived the cluster"

    job = pipeline.prepare(compose_cfg(out, "cluster.num_workers=2"))  # no Ray: reads only
    index = GradientIndex.open(job.cfg.index_url)
    parts = [data for _, data in index.iter_committed()]
    rows = np.concatenate([d.row_ids for d in parts])
    assert rows.tolist() == list(range(90))  # every training row exactly once
    # The cluster's rows are the gradients this process computes for the same rows.
    model = build_model(job.cfg)
    computer = GradientComputer(model, build_task(job.cfg), build_layer_compressors(job.cfg, model))
    want = computer.phi_rows(build_dataset(job.cfg, "train"), range(90), 16)
    for layer, got in want.phi.items():
        stored = np.concatenate([d.phi[layer] for d in parts])
        np.testing.assert_allclose(stored, got, rtol=1e-5, atol=1e-6)
    topk = results.load_table(index, "default", "topk").to_pandas()
    assert sorted(set(topk["query_row"])) == list(range(12))
    assert len(results.load_table(index, "default", "self_influence")) == 90
    progress = read_progress(Store(job.cfg.index_url))
    assert progress["stages"]["score"]["state"] == "done"
    assert progress["index"]["shards_done"] == progress["index"]["shards_total"] == 3
