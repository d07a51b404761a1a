"""End-to-end stages on an embedded Ray: exactness, invariance, resume."""

import contextlib
import dataclasses
import logging

import numpy as np
import pytest
import ray
import torch

from grass_dist import pipeline, run
from grass_dist.build import build_dataset, build_model
from grass_dist.errors import CorruptPreconditionerError, IndexNotFoundError, WorkerStartError
from grass_dist.index import GradientIndex, Store
from grass_dist.runtime import job_actors
from grass_dist.runtime.progress import read_progress
from grass_dist.runtime.reducer import preconditioner_path, read_preconditioner
from grass_dist.scoring import results
from tests.conftest import compose_cfg
from tests.helpers import layer_grad, per_sample_grads

pytestmark = pytest.mark.integration


def _index(tmp_path, *overrides, max_shards=None):
    job = pipeline.prepare(compose_cfg(tmp_path, *overrides))
    try:
        pipeline.run_index(job, max_shards=max_shards)
    finally:
        pipeline.shutdown(job)
    return job


def _rows(url):
    index = GradientIndex.open(url)
    parts = [data for _, data in index.iter_committed()]
    rows = np.concatenate([d.row_ids for d in parts])
    phi = {n: np.concatenate([d.phi[n] for d in parts]) for n in parts[0].phi}
    return rows, phi


def test_identity_index_rows_are_per_sample_gradients(ray_session, tmp_path):
    job = _index(tmp_path, "compression=identity")
    rows, phi = _rows(job.cfg.index_url)
    assert rows.tolist() == list(range(90))
    model = build_model(job.cfg)
    train = build_dataset(job.cfg, "train")
    x = torch.stack([train[i][0] for i in range(90)])
    y = torch.stack([train[i][1] for i in range(90)])
    exact = per_sample_grads(model, x, y)
    for layer, got in phi.items():
        want = layer_grad(exact, layer).reshape(90, -1).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_index_is_identical_across_worker_counts_and_close_across_shard_sizes(
    ray_session, tmp_path
):
    one = _rows(_index(tmp_path / "a", "cluster.num_workers=1").cfg.index_url)
    three = _rows(_index(tmp_path / "b", "cluster.num_workers=3").cfg.index_url)
    assert np.array_equal(one[0], three[0])
    for layer in one[1]:
        assert np.array_equal(one[1][layer], three[1][layer])  # bit-identical
    for size in (7, 100):
        other = _rows(_index(tmp_path / f"s{size}", f"index.shard_size={size}").cfg.index_url)
        assert np.array_equal(one[0], other[0])
        for layer in one[1]:
            np.testing.assert_allclose(one[1][layer], other[1][layer], rtol=1e-5, atol=1e-7)


def test_resume_recomputes_only_missing_shards_and_matches_a_clean_run(
    ray_session, tmp_path, caplog
):
    # An index without a commit is refused before scoring (a ValueError from the Fisher
    # sum, exit 1, once the queries were computed); one of some rows is scored, with a word.
    pipeline.prepare(compose_cfg(tmp_path / "r"))  # index.json, no shard yet
    said = r"holds no committed shard yet .*run python -m jobs\.index with the same settings"
    with pytest.raises(IndexNotFoundError, match=said):
        pipeline.prepare(compose_cfg(tmp_path / "r"), create_index=False, query=True)
    partial = _index(tmp_path / "r", max_shards=1)
    assert len(partial.index.committed()) == 1
    with caplog.at_level(logging.WARNING, logger="grass_dist"):
        pipeline.prepare(compose_cfg(tmp_path / "r"), create_index=False, query=True)
    assert "holds 30 of data.train's 90 rows (1 committed shard): the scores rank" in caplog.text
    first_file = next(iter(partial.index.committed().values())).file
    job = pipeline.prepare(compose_cfg(tmp_path / "r"))
    try:
        stats = pipeline.run_index(job)
    finally:
        pipeline.shutdown(job)
    assert stats == {"computed_shards": 2, "skipped_shards": 1, "rows": 60, "driver_shards": 0}
    assert first_file in {r.file for r in job.index.committed().values()}
    resumed = _rows(job.cfg.index_url)
    clean = _rows(_index(tmp_path / "c").cfg.index_url)
    assert sorted(resumed[0].tolist()) == list(range(90))  # every row exactly once
    for layer in clean[1]:
        assert np.array_equal(resumed[1][layer], clean[1][layer])
    # Nothing left to do, or a failure between stages: the progress record says how it ended.
    for error in (None, ValueError("lost")):
        again = pipeline.prepare(compose_cfg(tmp_path / "r"))
        with contextlib.suppress(ValueError), pipeline.running(again):
            assert pipeline.run_index(again)["computed_shards"] == 0
            if error is not None:
                raise error
        doc = read_progress(again.index.store, again.job_id)
        assert doc["state"] == ("done" if error is None else "failed")
        assert doc.get("error") == (None if error is None else "ValueError: lost")


@pytest.mark.parametrize("theirs_first", ["first batch", "every shard"])
def test_shards_another_writer_committed_first_are_reported_dropped(
    ray_session, tmp_path, theirs_first
):
    # Two jobs on one store.url: each shard is kept once, and the job whose attempts were
    # ignored says so rather than report them computed into the index; a job none of whose
    # shards was kept committed no first shard.
    job = pipeline.prepare(compose_cfg(tmp_path, "cluster.driver_shard=false"))
    other = GradientIndex.open(job.cfg.index_url)  # the other job's own view of the log
    commit = job.index.commit

    def racing(records, replace=None):
        if theirs_first == "every shard" or not other.committed():
            other.commit([dataclasses.replace(r, attempt="other") for r in records])
        return commit(records, replace)

    job.index.commit = racing
    try:
        stats = pipeline.run_index(job)
    finally:
        pipeline.shutdown(job)
    theirs = {sid for sid, r in job.index.committed().items() if r.attempt == "other"}
    assert theirs and stats["dropped_shards"] == len(theirs)
    assert stats["computed_shards"] == 3 and len(job.index.committed()) == 3
    record = read_progress(job.index.store, job.job_id)
    if theirs_first == "every shard":
        assert len(theirs) == 3
        assert job.first_shard_s is None and "first_shard_s" not in record
    else:
        assert job.first_shard_s is not None and record["first_shard_s"] == round(
            job.first_shard_s, 3
        )


def test_identity_influence_equals_direct_damped_fisher_influence(ray_session, tmp_path):
    damping = 0.05
    job = pipeline.prepare(
        compose_cfg(
            tmp_path,
            "compression=identity",
            "scoring.dense=true",
            "scoring.topk=5",
            f"precondition.damping={damping}",
        )
    )
    try:
        pipeline.run_index(job)
        query = pipeline.query_phi(job)
        pipeline.release_workers(job)
        pipeline.run_precondition(job)
        pipeline.run_score(job, query)
    finally:
        pipeline.shutdown(job)
    model = build_model(job.cfg)
    train, query = build_dataset(job.cfg, "train"), build_dataset(job.cfg, "query")

    def grads(ds):
        x = torch.stack([ds[i][0] for i in range(len(ds))]).double()
        y = torch.stack([ds[i][1] for i in range(len(ds))])
        g = per_sample_grads(model.double(), x, y)
        return {n: layer_grad(g, n).reshape(len(ds), -1) for n in ("fc1", "out")}

    g_train, g_query = grads(train), grads(query)
    expected = torch.zeros(90, 12, dtype=torch.float64)
    expected_self = torch.zeros(90, dtype=torch.float64)
    for n in g_train:
        h = g_train[n].T @ g_train[n] / 90
        lam = damping * torch.trace(h) / h.shape[0]
        inv = torch.linalg.inv(h + lam * torch.eye(h.shape[0], dtype=torch.float64))
        expected += g_train[n] @ inv @ g_query[n].T
        expected_self += ((g_train[n] @ inv) * g_train[n]).sum(1)
    dense = torch.tensor(results.load_dense(job.index, "default"), dtype=torch.float64)
    assert dense.shape == (90, 12)
    rel = (dense - expected).norm() / expected.norm()
    assert rel < 1e-4, float(rel)
    self_inf = results.load_table(job.index, "default", "self_influence").to_pandas()
    rel_self = np.abs(self_inf["self_influence"].to_numpy() - expected_self.numpy()).max()
    assert rel_self / expected_self.abs().max() < 1e-4
    topk = results.load_table(job.index, "default", "topk").to_pandas()
    best = topk[(topk["kind"] == "proponent") & (topk["rank"] == 0)].sort_values("query_row")
    assert best["train_row"].tolist() == expected.argmax(0).tolist()
    worst = topk[(topk["kind"] == "opponent") & (topk["rank"] == 0)].sort_values("query_row")
    assert worst["train_row"].tolist() == expected.argmin(0).tolist()
    assert set(topk["train_key"]) <= set(train.keys)


def test_job_summary_times_its_first_committed_shard(ray_session, tmp_path, capsys):
    cfg = compose_cfg(tmp_path)
    summary = run.index(cfg)  # as `python -m jobs.index` runs it: early actors, then the pool
    first = summary["first_shard_seconds"]
    assert 0 < first <= summary["total_seconds"]
    assert read_progress(Store(summary["index_url"]))["first_shard_s"] == first
    up = summary["startup_seconds"]  # where the start-up went, in order
    assert list(up) == sorted(up, key=up.get)
    assert {"prepared", "ray"} <= up.keys() <= {"prepared", "ray", "first_worker"}
    assert 0 < up["prepared"] < first and max(up.values()) <= summary["total_seconds"]
    assert "first_shard_seconds" not in run.index(cfg)  # resumed: nothing to commit


def test_the_reducer_starts_during_the_index_and_its_task_processes_only_on_idle_cpus(
    ray_session, tmp_path
):
    # A reducer process (cluster.driver_reduce_mib=0: this index is small enough for the
    # driver). The session has 4 CPUs. Workers taking 1 of them leave room for the
    # reducer's map task processes too; workers holding all 4 are lent to its stages
    # instead, so no task process starts. Either way the reducer starts during the index
    # (after its first shard) and the precondition stage runs on it.
    for name, overrides, warmed in (
        ("idle", [], 2),
        ("busy", ["cluster.num_workers=2", "cluster.cpus_per_worker=2"], 0),
    ):
        given = (f"store.url={tmp_path / name}", "cluster.driver_reduce_mib=0", *overrides)
        job = pipeline.prepare(compose_cfg(tmp_path, *given))
        try:
            pipeline.run_index(job, precondition_next=True)
            assert job._reducer is not None and job._reducer.started == 1
            assert job._reducer.warmed == warmed, name
            assert pipeline.run_precondition(job)["rows"] == job.n_train
            assert job._reducer.started == 1
        finally:
            pipeline.shutdown(job)
    # A job that builds no preconditioner after its index never starts one.
    job = pipeline.prepare(compose_cfg(tmp_path, f"store.url={tmp_path / 'index_only'}"))
    try:
        pipeline.run_index(job)
        assert job._reducer is None
    finally:
        pipeline.shutdown(job)


def test_a_small_index_is_reduced_by_the_driver_to_the_bits_of_a_reducer_process(
    ray_session, tmp_path
):
    # The same job twice, each on its own store (an index is the same bits either way).
    base = ("scoring.dense=true", "scoring.self_influence=true", "precondition.damping=0.05")
    out = {}
    for name, limit in (("driver", 64), ("process", 0)):
        given = (*base, f"cluster.driver_reduce_mib={limit}", f"store.url={tmp_path / name}")
        job = pipeline.prepare(compose_cfg(tmp_path, *given), query=True)
        with pipeline.running(job):
            pipeline.run_index(job, precondition_next=True)
            query = pipeline.query_phi(job)
            pre = pipeline.run_precondition(job)
            scored = pipeline.run_score(job, query)
            in_driver, actor = job._reducer.in_driver, job._reducer.actor
        assert not pre["reused"]
        if name == "driver":
            assert in_driver and not isinstance(actor, ray.actor.ActorHandle)
            assert pre["ran_on"] == scored["ran_on"] == "the driver"
        else:
            assert not in_driver and isinstance(actor, ray.actor.ActorHandle)
        index = job.index
        out[name] = {
            "preconditioner": index.get_artifact(preconditioner_path("fisher")),
            "dense": results.load_dense(index, "default"),
            **{k: results.load_table(index, "default", k) for k in ("topk", "self_influence")},
        }
    driver, process = out["driver"], out["process"]
    assert driver["preconditioner"] == process["preconditioner"]
    np.testing.assert_array_equal(driver["dense"], process["dense"])
    for kind in ("topk", "self_influence"):
        assert driver[kind].equals(process[kind]), kind


def test_a_worker_whose_model_differs_from_the_drivers_is_refused(ray_session, tmp_path):
    job = pipeline.prepare(compose_cfg(tmp_path))
    job.model_hash = "0" * 64  # as if the driver had built another model
    try:
        said = (
            r"worker \d+ on node \S+ failed .*differ from the driver's .*sha256.*pass the trained"
        )
        with pytest.raises(WorkerStartError, match=said):
            job_actors.ready_pool(job)
    finally:
        pipeline.shutdown(job)


def test_a_rescore_of_the_same_shards_reuses_the_stored_preconditioner(
    ray_session, tmp_path, caplog
):
    def scored(damping: float, name: str, shards: int | None = 0) -> dict:
        job = pipeline.prepare(
            compose_cfg(
                tmp_path,
                "scoring.dense=true",
                f"precondition.damping={damping}",
                f"run.name={name}",
            ),
            query=True,
        )
        with pipeline.running(job):
            pipeline.run_index(job, max_shards=shards)  # this many more shards (None: all)
            query = pipeline.query_phi(job)
            out = pipeline.run_precondition(job)
            pipeline.run_score(job, query)
        return {**out, "dense": results.load_dense(job.index, name), "job": job}

    built = scored(0.1, "built", shards=2)
    again = scored(0.01, "again")  # the same two shards: no pass over the index
    assert (built["reused"], again["reused"], again["ran_on"]) == (False, True, "store (reused)")
    assert again["layers"] == built["layers"]
    # Its scores are those of a preconditioner built afresh at that damping.
    index = again["job"].index
    index.store.delete(preconditioner_path("fisher"))
    fresh = scored(0.01, "fresh")
    assert fresh["reused"] is False
    np.testing.assert_array_equal(again["dense"], fresh["dense"])
    # A file damaged at rest is refused when read, and the next job builds it again.
    data = bytearray(index.get_artifact(preconditioner_path("fisher")))
    data[-40:] = bytes(40)
    index.put_artifact(preconditioner_path("fisher"), bytes(data))
    said = r"fisher\.safetensors is damaged: its data does not match .*Fix: run the job's"
    with pytest.raises(CorruptPreconditionerError, match=said):
        read_preconditioner(index, "fisher")
    with caplog.at_level(logging.WARNING):
        healed = scored(0.01, "healed")
    assert healed["reused"] is False
    said = "fisher.safetensors is damaged: its data does not match the sha256 its header "
    assert said in caplog.text and "; building it again from the index" in caplog.text
    assert caplog.text.count("is damaged") == 1 and "Fix:" not in caplog.text
    np.testing.assert_array_equal(healed["dense"], fresh["dense"])
    assert read_preconditioner(index, "fisher").n == healed["rows"]
    # Another shard committed: another Fisher sum.
    grown = scored(0.01, "grown", shards=None)
    assert grown["reused"] is False and grown["rows"] > fresh["rows"]


def test_a_topk_past_half_the_rows_is_told_a_topk_that_keeps_the_lists_apart():
    assert pipeline.topk_overlap(5, 10) is None
    said = pipeline.topk_overlap(40, 60)
    assert "share 20 rows" in said and said.endswith(
        "set scoring.topk to 30 or less to keep them apart"
    )
    # One training row: no top-k keeps them apart (topk=0 is refused), and none is offered.
    one = pipeline.topk_overlap(2, 1)
    assert "each list holds all 1 rows" in one and "scoring.topk to" not in one
    assert one.endswith("with one training row, both lists are that row")
