"""The Python API's calls on one index: who differentiates the queries (the driver or the
workers, to the same bits), the reducer kept from one call to the next, and top-k lists
that must share rows."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import numpy as np
import pytest
import ray
import torch
from torch.utils.data import TensorDataset

import grass_dist as gd
from grass_dist.models.digits import digits_mlp


def _stops(actor, within_s: float = 60.0) -> bool:
    """Whether `actor` is dead within `within_s` (ray.kill is asynchronous: a call made
    right after it may still be answered)."""

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.integration
def test_a_small_query_set_is_computed_by_the_driver_as_a_worker_computes_it(
    ray_session, tmp_path, caplog
):
    # Index.attribute starts no worker pool for a query set of one chunk (index.shard_size
    # rows): the driver's replica computes it on a worker's thread count, to the same bits.
    model = digits_mlp(hidden=[16], epochs=1, n_train=60, n_query=5, cache_dir=str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(100, 64, generator=gen), torch.randint(0, 10, (100,), generator=gen)
    model.train()  # the caller's model as a notebook may hold it: training, a layer frozen
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    # A reducer process, as for an index past cluster.driver_reduce_mib.
    index = gd.Index.build(model, TensorDataset(x[:60], y[:60]), store=str(tmp_path / "i"), k=16,
                           workers=1, overrides=[f"run.output_dir={tmp_path}",
                                                 "index.shard_size=32",
                                                 "cluster.driver_reduce_mib=0"])  # fmt: skip
    query = TensorDataset(x[60:65], y[60:65])
    with caplog.at_level(logging.INFO, logger="grass_dist"):
        mine = index.attribute(query, dense=True, name="driver")
    assert "query gradients: 5 rows, computed by the driver" in caplog.text
    assert model.training and not frozen.requires_grad  # left as the caller had it
    assert all(p.requires_grad for p in list(model.parameters())[1:])

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="grass_dist"):
        theirs = index.attribute(
            query, dense=True, name="workers", overrides=["cluster.driver_shard=false"]
        )
    assert "computed by the driver" not in caplog.text
    np.testing.assert_array_equal(mine.dense(), theirs.dense())  # bit for bit

    # A top-k past half the training set: the two lists share rows, and the log says so.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grass_dist"):
        wide = index.attribute(query, topk=40, name="wide").topk()
    assert (
        "scoring.topk=40 of 60 training rows: each query's proponents and opponents "
        in (caplog.text)
        and "share 20 rows" in caplog.text
    )
    q0 = wide[wide["query_row"] == 0]
    shared = set(q0[q0["kind"] == "proponent"]["train_row"]) & set(
        q0[q0["kind"] == "opponent"]["train_row"]
    )
    assert len(shared) == 20

    # A top-k past the whole training set: each list is the whole set, and the log says so.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grass_dist"):
        whole = index.attribute(query, topk=100, name="whole").topk()
    assert (
        "share 60 rows (a row ranked both among its most and its least helpful); each "
        "list holds all 60 rows" in caplog.text
    )
    assert (whole.groupby(["query_row", "kind"]).size() == 60).all()

    # The calls shared one reducer process, kept between them; close() stops it, and the
    # next call starts another, as does a call whose reducer would take other arguments.
    kept = index._kept.handle
    assert kept.started == 1 and "starting reducer" not in caplog.text
    actor = kept.actor
    index.close()
    assert index._kept.handle is None
    assert _stops(actor)
    again = index.attribute(query, dense=True, name="again", overrides=["cluster.num_workers=3"])
    np.testing.assert_array_equal(again.dense(), mine.dense())
    other = index._kept.handle.actor
    index.attribute(query, name="more", overrides=["cluster.num_workers=1"])  # 2 map tasks
    assert index._kept.handle.actor._actor_id not in (actor._actor_id, other._actor_id)

    # More than one chunk of queries: with one worker the driver computes them all, chunk
    # by chunk (that worker would, on the same CPUs); with more, the worker pool does, its
    # chunks in parallel, to the same bits.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="grass_dist"):
        many = index.attribute(TensorDataset(x[60:], y[60:]), dense=True, name="many")
    assert "query gradients: 40 rows, computed by the driver" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="grass_dist"):
        pooled = index.attribute(
            TensorDataset(x[60:], y[60:]), dense=True, name="pooled",
            overrides=["cluster.num_workers=2"],
        )  # fmt: skip
    assert "computed by the driver" not in caplog.text
    np.testing.assert_array_equal(pooled.dense(), many.dense())
    # (In batches of other sizes: equal to rounding.)
    np.testing.assert_allclose(many.dense()[:, :5], mine.dense(), rtol=1e-5, atol=1e-7)


_ONE_WORKER_THEN_TWO = """
import json, sys
import numpy as np, ray, torch
from torch.utils.data import TensorDataset
import grass_dist as gd

torch.manual_seed(0)
x, y = torch.rand(90, 8), torch.arange(90) % 3
model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
train, query = TensorDataset(x[:80], y[:80]), TensorDataset(x[80:], y[80:])
scores, said = [], {}
for workers in (1, 2):
    store = f"{sys.argv[1]}/w{workers}"
    index = gd.Index.build(model, train, store=store, k=8, workers=workers,
                           overrides=["index.shard_size=20", f"run.output_dir={sys.argv[1]}"])
    result = index.attribute(query, dense=True)
    scores.append(result.dense())
    said[workers] = {"ray": ray.is_initialized(), "driver_shards":
                     index.summary["index"]["driver_shards"], "startup":
                     sorted(index.summary["startup_seconds"])}
said["same"] = bool(np.array_equal(scores[0], scores[1]))
print(json.dumps(said))
"""


@pytest.mark.integration
def test_one_worker_calls_start_no_ray_and_score_as_calls_with_workers(tmp_path):
    # As the jobs' one-worker commands: Index.build and attribute with workers=1 ran in a
    # Ray they started (a worker indexed every shard while the caller waited for it).
    script = tmp_path / "calls.py"
    script.write_text(_ONE_WORKER_THEN_TWO)
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    one, two = said["1"], said["2"]
    assert one == {"ray": False, "driver_shards": 4, "startup": ["prepared"]}, one
    assert two["ray"] and "ray" in two["startup"], two
    assert said["same"]  # the same scores, to the bit, with Ray and its workers
