"""The query service over HTTP: same top-k as the batch job, 4xx on bad bodies, concurrency.

One module-wide Ray runs the batch job (index, preconditioner, scores of the query split),
then serves the finished index twice on 127.0.0.1: with the train phi cached in the replica
and streamed from the shards (serve.cache_bytes=0), under two route prefixes. The batch job
also scores the queries as with precondition.damping=auto (result set "auto"), which a
third app serves with damping=auto under /auto.
"""

import dataclasses
import json
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
import torch
from omegaconf import OmegaConf
from ray import serve

from grass_dist import Client, pipeline
from grass_dist.build import build_dataset, build_layer_compressors, build_model, build_task
from grass_dist.config import JobConfig
from grass_dist.errors import (
    BadRequestError,
    ConfigError,
    DampingNotChosenError,
    FingerprintMismatchError,
    ServiceCheckError,
    ServiceError,
    ServiceUnreachableError,
)
from grass_dist.gradients.computer import GradientComputer
from grass_dist.scoring import results
from grass_dist.service import app, engine
from tests.conftest import compose_cfg
from tests.helpers import assert_answers_equal_topk_table, assert_topk_close
from tests.ray_procs import free_port
from tests.synthetic import read_all

pytestmark = pytest.mark.integration


AUTO = ["precondition.damping=auto", "precondition.grid=[0.001,10.0]", "run.name=auto"]


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    common = [f"serve.port={port}", "serve.cpus_per_replica=0.5", "serve.max_examples=16"]
    cfg = compose_cfg(tmp, *common)
    auto_cfg = compose_cfg(tmp, *common, *AUTO, "serve.route_prefix=/auto", "serve.app_name=a")
    job = pipeline.prepare(cfg)
    try:
        pipeline.run_index(job)
        pipeline.run_precondition(job)
        query = pipeline.query_phi(job)
        pipeline.release_workers(job)
        pipeline.run_score(job, query)
        # The scoring stage of `jobs.attribute precondition.damping=auto run.name=auto` on
        # the same index, queries and reducer: it chooses delta and records the choice.
        auto = JobConfig.from_cfg(OmegaConf.to_container(auto_cfg, resolve=True))
        chosen = pipeline.score_stage(dataclasses.replace(job, cfg=auto), query)["damping"]
    finally:
        pipeline.shutdown(job)
    cached = app.start(OmegaConf.to_container(cfg, resolve=True))
    streamed_cfg = compose_cfg(
        tmp, *common, "serve.cache_bytes=0", "serve.route_prefix=/stream", "serve.app_name=s"
    )
    streamed = app.start(OmegaConf.to_container(streamed_cfg, resolve=True))
    yield job, cached, streamed, (auto_cfg, chosen["chosen"])
    app.stop()


@pytest.fixture(scope="module")
def auto_service(service):
    """The service with damping=auto over result set "auto": (delta chosen, its URL)."""
    *_, (auto_cfg, chosen) = service
    return chosen, app.start(OmegaConf.to_container(auto_cfg, resolve=True))


def query_items(job):
    query = build_dataset(job.cfg, "query")
    return [{"input": query[i][0], "label": int(query[i][1])} for i in range(len(query))]


def test_health_reports_the_index(service):
    _, cached, streamed, _ = service
    assert Client(cached).health() == {
        "status": "ok",
        "train_rows": 90,
        "layers": ["fc1", "out"],
        "cached": True,
        "kinds": ["grad_dot", "cosine", "influence"],
        "default_kind": "influence",
    }
    assert Client(streamed).health()["cached"] is False


def test_answers_equal_the_batch_jobs_top_k_cached_and_streamed(service):
    job, cached, streamed, _ = service
    items = query_items(job)
    table = results.load_table(job.index, "default", "topk").to_pandas()
    for url in (cached, streamed):
        answers = Client(url).query(items, topk=10, kind="influence")
        assert len(answers) == 12
        assert_answers_equal_topk_table(answers, table)
    # The dataset's own items, (input tensor, label tensor), as a user has them at hand.
    query = build_dataset(job.cfg, "query")
    as_items = Client(cached).query([query[i] for i in range(12)], topk=10, kind="influence")
    assert as_items == answers


def test_a_client_with_nothing_at_its_url_says_so():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnreachableError, match=f"no answer from {url} .*jobs.serve"):
        Client(url).health()


def test_damping_auto_serves_the_delta_the_batch_job_chose(service, auto_service):
    job, *_ = service
    chosen, url = auto_service
    done = results.manifest(job.index, "auto")
    assert done["summary"]["damping_selection"]["chosen"] == chosen in (0.001, 10.0)
    table = results.load_table(job.index, "auto", "topk").to_pandas()
    answers = Client(url).query(query_items(job), topk=10, kind="influence")
    assert_answers_equal_topk_table(answers, table)
    # The default result set was scored at delta=0.1, outside the grid: other scores.
    default = results.load_table(job.index, "default", "topk").to_pandas()
    assert not np.allclose(default["score"], table["score"], rtol=1e-3)


@pytest.mark.parametrize("name", ["default", "never_scored"])
def test_damping_auto_without_a_recorded_choice_is_refused(service, name):
    job, *_ = service
    raw = {**job.raw, "precondition": {**job.raw["precondition"], "damping": "auto"}}
    raw["run"] = {**raw["run"], "name": name}
    with pytest.raises(DampingNotChosenError) as info:
        app.check(JobConfig.from_cfg(raw))
    message = str(info.value)
    assert f"run.name={name!r}" in message and "precondition.damping=auto" in message
    assert "python -m jobs.attribute precondition.damping=auto" in message


def test_the_pre_deploy_check_answers_a_real_influence_query(service, monkeypatch):
    job, *_ = service
    app.check(JobConfig.from_cfg(job.raw))  # the index as built: every kind answers
    real = engine.prepare_queries

    def broken(phi, kind, pre, damping):  # what damping='auto' reaching the maths did
        if kind == "influence":
            raise TypeError(f"unsupported operand type(s) for *: {type(damping).__name__!r}")
        return real(phi, kind, pre, damping)

    monkeypatch.setattr(engine, "prepare_queries", broken)
    with pytest.raises(ServiceCheckError, match="kind=influence.*TypeError"):
        app.check(JobConfig.from_cfg(job.raw))
    # A task whose request format the check cannot guess is told how to supply an example.
    monkeypatch.setattr(app, "probe_example", lambda task, item: {"text": "a digit"})
    with pytest.raises(ServiceCheckError, match="encode_example"):
        app.check(JobConfig.from_cfg(job.raw))


@pytest.mark.parametrize("kind", ["grad_dot", "cosine"])
def test_other_kinds_match_a_direct_computation(service, kind):
    job, cached, *_ = service
    items = query_items(job)[:3]
    model = build_model(job.cfg)
    computer = GradientComputer(model, build_task(job.cfg), build_layer_compressors(job.cfg, model))
    batch = [(it["input"], torch.tensor(it["label"])) for it in items]
    q = computer.phi_rows(batch, range(3), 16).phi
    rows, train = read_all(job.index)
    t = np.concatenate([train[n] for n in q], 1).astype(np.float64)
    qq = np.concatenate(list(q.values()), 1).astype(np.float64)
    exact = t @ qq.T
    if kind == "cosine":
        exact /= np.linalg.norm(t, axis=1, keepdims=True) @ np.linalg.norm(qq, axis=1)[None]
    answers = Client(cached).query(items, topk=7, kind=kind)
    for label, largest in (("proponents", True), ("opponents", False)):
        got_rows = [[g["train_row"] for g in a[label]] for a in answers]
        got_vals = [[g["score"] for g in a[label]] for a in answers]
        tol = 1e-5 * np.abs(exact).max()
        assert_topk_close(got_rows, got_vals, exact[np.argsort(rows)], 7, largest, tol)


def post(url: str, body: bytes, method: str = "POST") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_4xx_and_the_service_keeps_serving(service):
    job, cached, *_ = service
    good = {"input": query_items(job)[0]["input"].tolist(), "label": 1}
    cases = [
        (b"{oops", 400),
        (json.dumps({"examples": [good], "extra": 1}).encode(), 400),
        (json.dumps({"examples": [{**good, "input": good["input"][:10]}]}).encode(), 422),
        (json.dumps({"examples": [{**good, "label": 0.5}]}).encode(), 422),
        (json.dumps({"examples": [{**good, "label": 99}]}).encode(), 422),
        (json.dumps({"examples": [{"input": good["input"]}]}).encode(), 400),
        (b"[" * 100_000 + b"]" * 100_000, 400),
        (json.dumps({"examples": [good] * 17}).encode(), 413),
        (b'{"examples": [' + b"0," * 3_000_000 + b"0]}", 413),
    ]
    for body, status in cases:
        code, answer = post(f"{cached}/query", body)
        assert (code, "error" in answer) == (status, True), (body[:80], code, answer)
    # -100 is cross-entropy's "ignore": answered, it would be all-zero scores. Of several
    # examples, the ones that do not fit are named.
    for label, said in (
        (-100, r"examples \[0\]: .*Target -100 is out of bounds"),
        (99, "examples [2]"),
    ):
        body = json.dumps(
            {"examples": [good, good, {**good, "label": label}][-1 if label < 0 else 0 :]}
        )
        code, answer = post(f"{cached}/query", body.encode())
        assert code == 422 and re.search(said if label < 0 else re.escape(said), answer["error"])
        assert "rows" not in answer["error"], answer  # the client sent examples, not rows
        assert answer["error"].endswith("labels within the model's classes)"), answer
    assert post(f"{cached}/query", b"", method="GET")[0] == 405
    assert post(f"{cached}/nowhere", b"{}")[0] == 404
    with pytest.raises(ServiceError) as info:
        Client(cached).query([good], kind="nonsense")
    assert info.value.status == 400 and "kind" in info.value.message
    code, answer = post(f"{cached}/query", json.dumps({"examples": [good], "topk": 3}).encode())
    assert code == 200 and len(answer["results"][0]["proponents"]) == 3


def test_eight_clients_times_twenty_requests_are_all_answered_correctly(service):
    job, cached, *_ = service
    items = query_items(job)
    want = {q: a["proponents"] for q, a in enumerate(Client(cached).query(items, topk=5))}

    def same(got: list[dict], ref: list[dict]) -> bool:
        # One example per request: its gradient may differ from the batched one in the
        # last bits, so scores compare to float tolerance and rows exactly.
        return [g["train_row"] for g in got] == [g["train_row"] for g in ref] and np.allclose(
            [g["score"] for g in got], [g["score"] for g in ref], rtol=1e-5, atol=1e-7
        )

    def client(c: int) -> list[bool]:
        api, ok = Client(cached), []
        for r in range(20):
            q = (c * 20 + r) % len(items)
            ok.append(same(api.query([items[q]], topk=5)[0]["proponents"], want[q]))
        return ok

    with ThreadPoolExecutor(8) as pool:
        answers = [ok for part in pool.map(client, range(8)) for ok in part]
    assert len(answers) == 160 and all(answers)


def test_a_streamed_service_whose_replica_holds_every_free_cpu_still_answers(
    service, ray_session, monkeypatch
):
    """A replica holding every CPU the cluster has left leaves none for scorer tasks (as
    `serve.replicas=2` does on a 2-CPU machine): it scores the shards itself rather than
    wait for a CPU that never frees, with the batch job's answers."""
    job, *_ = service
    monkeypatch.setattr(app, "_STARTED", {"apps": [], "ray": False})  # this test's start only
    held = ray_session.available_resources()["CPU"]
    own = {"cache_bytes": 0, "cpus_per_replica": held, "app_name": "full", "route_prefix": "/full"}
    url = app.start({**job.raw, "serve": {**job.raw["serve"], **own}})
    try:
        assert ray_session.available_resources().get("CPU", 0) == 0
        answers = Client(url, timeout=60).query(query_items(job), topk=10, kind="influence")
    finally:
        app.stop()
    assert_answers_equal_topk_table(
        answers, results.load_table(job.index, "default", "topk").to_pandas()
    )


@serve.deployment(ray_actor_options={"num_cpus": 0})
class _Other:
    """Someone else's Serve application on the same Ray."""

    def __call__(self, request) -> str:
        return "other"


def test_stopping_the_service_leaves_other_serve_applications_running(service, monkeypatch):
    """On a shared Ray (a joined cluster, or a caller's own), `stop` deletes what `start`
    deployed and nothing else; the module's Ray was not started by `start` and keeps running."""
    job, *_ = service
    monkeypatch.setattr(app, "_STARTED", {"apps": [], "ray": False})  # this test's start only
    serve.run(_Other.bind(), name="other", route_prefix="/other")
    own = {"app_name": "mine", "route_prefix": "/mine", "cpus_per_replica": 0.1}
    try:
        url = app.start({**job.raw, "serve": {**job.raw["serve"], **own}})
        assert Client(url, timeout=60).query(query_items(job)[:1], topk=1)
        app.stop()
        apps = serve.status().applications
        assert "mine" not in apps and apps["other"].status == "RUNNING"
        assert ray.is_initialized()
    finally:
        serve.delete("other")


def test_more_replicas_than_the_embedded_ray_can_place_are_refused_before_deploying(
    service, ray_session
):
    job, *_ = service
    total = ray_session.cluster_resources()["CPU"]
    n = int(total) + 1
    own = {"replicas": n, "app_name": "toomany", "route_prefix": "/toomany"}
    said = rf"serve.replicas={n} x serve.cpus_per_replica=1 need {n} CPUs and the Ray "
    said += rf"cluster has {total:g}: lower serve.replicas"
    with pytest.raises(ConfigError, match=said):
        app.start({**job.raw, "serve": {**job.raw["serve"], **own, "cpus_per_replica": 1.0}})
    assert "toomany" not in serve.status().applications


def test_an_index_with_another_fingerprint_is_refused_before_deploying(service, tmp_path):
    job, *_ = service
    raw = dict(job.raw)
    raw["compression"] = {**raw["compression"], "k": 16}
    with pytest.raises(FingerprintMismatchError):
        app.check(JobConfig.from_cfg(raw))


def test_only_loopback_hosts_count_as_local():
    assert app._is_loopback("127.0.0.1") and app._is_loopback("::1")
    assert app._is_loopback("localhost")
    assert not app._is_loopback("0.0.0.0") and not app._is_loopback("10.1.2.3")


def test_a_preconditioner_from_fewer_shards_than_the_index_now_holds_is_not_served(
    ray_session, tmp_path
):
    # The index grew after its preconditioner was built: a service (re)started on it would
    # have answered influence from the old H, unlike the batch job, which rebuilds it.
    grown = ["model.n_train=60", "data.train.n_train=90"]
    small = pipeline.prepare(compose_cfg(tmp_path, "model.n_train=60", "data.train.n_train=60"))
    try:
        pipeline.run_index(small)
        pipeline.run_precondition(small)
    finally:
        pipeline.shutdown(small)
    job = pipeline.prepare(compose_cfg(tmp_path, *grown))
    try:
        pipeline.run_index(job)
        stale = engine.QueryEngine(job.cfg)
        assert stale.pre is None and stale.info()["kinds"] == ["grad_dot", "cosine"]
        assert "60 rows; the index holds 90" in stale.unavailable
        items = stale.decode(query_items(job)[:2])
        with pytest.raises(BadRequestError, match="jobs.score") as refused:
            stale.query(items, topk=5, kind="influence")
        assert refused.value.status == 409
        # What the message says to do: jobs.score builds H from the shards committed now.
        pipeline.run_precondition(job)
        pipeline.run_score(job, pipeline.query_phi(job))
    finally:
        pipeline.shutdown(job)
    served = engine.QueryEngine(job.cfg)
    assert served.pre is not None and served.pre.n == 90
    answers = served.query(served.decode(query_items(job)), topk=10, kind="influence")
    assert_answers_equal_topk_table(
        answers, results.load_table(job.index, "default", "topk").to_pandas()
    )


def test_a_task_without_decode_example_is_served_examples_shaped_like_its_items(
    ray_session, tmp_path
):
    # README asks a task for collate, to and per_sample_loss only: a user's own task is
    # served too, its examples shaped like its training items, as the built-in task's are.
    job = pipeline.prepare(compose_cfg(tmp_path, "task._target_=tests.helpers.PlainCE"))
    try:
        pipeline.run_index(job)
        pipeline.run_precondition(job)
        pipeline.run_score(job, pipeline.query_phi(job))
    finally:
        pipeline.shutdown(job)
    served = engine.QueryEngine(job.cfg)
    answers = served.query(served.decode(query_items(job)), topk=10, kind="influence")
    assert_answers_equal_topk_table(
        answers, results.load_table(job.index, "default", "topk").to_pandas()
    )
    with pytest.raises(BadRequestError, match=r"examples\[0\]: an example has the fields \['x'\]"):
        served.decode([{"x": [1.0]}])
    # Items a request could not be shaped like need the task's own decode_example.
    with pytest.raises(ConfigError, match=r"has no decode_example.*\(tuple\) are neither"):
        engine.example_decoder(job.cfg, build_task(job.cfg), (1, 2, 3))
