"""LDS ground truth: models retrained on random training subsets, built once, kept in the store.

For m subsets S_j (each a seeded random `fraction` of the training rows) and s seeds, a
Ray task per (j, seed) retrains the model on S_j only, with the user's `lds.train` recipe
or the builder's own (`grass_dist.fidelity.retrain`), and measures f(z_t) for every query t:
the log-probability of the true label ("logprob") or log(p / (1 - p)) ("margin"). y_j(t)
is the mean over the seeds. The result is cached under `<lds url>/<digest>/`, where the
digest covers everything the outputs depend on (model, retraining recipe, data, task,
subsets, seeds, output), so a second call with the same recipe reads it back and trains
nothing:

    <lds url>/<digest>/ground_truth.parquet   subset, rows (list<int32>), y (Q), y_seeds (s*Q)
    <lds url>/<digest>/spec.json              the recipe, sizes and query keys; written last
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from tqdm import tqdm

from grass_dist.assembly import open_store
from grass_dist.build import build_dataset, build_task
from grass_dist.config import JobConfig
from grass_dist.errors import ConfigError, GroundTruthError
from grass_dist.fidelity import retrain
from grass_dist.gradients.computer import sample_key
from grass_dist.index import Store
from grass_dist.index.shards import table_from_bytes
from grass_dist.runtime.seeding import derive_seed, generator
from grass_dist.tasks.classifier import ClassificationTask, class_ids

log = logging.getLogger(__name__)

FILE = "ground_truth.parquet"
SPEC = "spec.json"
_BATCH = 512
# Model arguments that do not change a retrained model: where the cache lives, and the
# seed, which retraining replaces by its own per-(subset, seed) seeds.
_NOT_RECIPE = ("cache_dir", "seed")


@dataclass
class GroundTruth:
    """Retrained outputs y (m, Q) on subsets given as masks (m, n_train) of 0/1."""

    digest: str
    masks: np.ndarray  # (m, n_train) bool
    y: np.ndarray  # (m, Q) float64, mean over seeds
    y_seeds: np.ndarray  # (s, m, Q) float64
    query_keys: list[str]
    spec: dict[str, Any]


def recipe(job: JobConfig) -> dict[str, Any]:
    """Everything the ground truth depends on, as canonical JSON-able data."""
    model = {k: v for k, v in job.model.items() if k not in _NOT_RECIPE}
    lds = job.lds
    spec = {
        "model": model,
        "train": job.data["train"],
        "query": job.data.get("query"),
        "task": job.task,
        "subsets": lds.subsets,
        "seeds": lds.seeds,
        "fraction": lds.fraction,
        "seed": lds.seed,
        "output": lds.output,
    }
    if lds.train is not None:  # absent for the built-in recipe: its digests stay as they were
        spec["recipe"] = lds.train
    return json.loads(json.dumps(spec, sort_keys=True, default=str))


def digest(spec: dict[str, Any]) -> str:
    """16 hex digits of sha256 over the canonical recipe."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def subset_masks(n_train: int, subsets: int, fraction: float, seed: int) -> np.ndarray:
    """(subsets, n_train) bool: row j holds round(fraction * n_train) rows drawn for subset j."""
    size = max(1, round(fraction * n_train))
    masks = np.zeros((subsets, n_train), dtype=bool)
    for j in range(subsets):
        order = torch.randperm(n_train, generator=generator(seed, "lds_subset", str(j)))
        masks[j, order[:size].numpy()] = True
    return masks


def training_seed(seed: int, subset: int, replicate: int) -> int:
    """The retraining seed of (subset, replicate), independent of the model's own seed."""
    return derive_seed(seed, "lds_train", str(subset), str(replicate)) & (2**31 - 1)


def output_reader(task: Any) -> Any:
    """What reads (logits, labels) off a batch for the outputs: the job's task when it has
    `logits(model, batch)` and `split(batch)`, else the classification reading of
    `(input, label)` pairs or input/label dicts. A user's task often defines only its loss,
    and the outputs (log p of the true label) do not depend on the loss attributed."""
    if hasattr(task, "logits") and hasattr(task, "split"):
        return task
    return ClassificationTask()


def model_outputs(model: torch.nn.Module, task: Any, dataset: Any, output: str) -> np.ndarray:
    """f(z_t; model) for every item of `dataset`: (Q,) float64.

    "logprob" is log p(true label); "margin" is log(p / (1 - p)) = logit_y - logsumexp of
    the other logits (TRAK's output function). Batches are read by `output_reader(task)`.
    """
    task = output_reader(task)
    out = []
    with torch.no_grad():
        for lo in range(0, len(dataset), _BATCH):
            batch = task.collate([dataset[i] for i in range(lo, min(lo + _BATCH, len(dataset)))])
            labels = class_ids(task.split(batch)[1])
            logits = task.logits(model, batch).double()
            picked = logits.gather(1, labels[:, None])[:, 0]
            if output == "logprob":
                out.append(picked - torch.logsumexp(logits, 1))
            else:
                others = logits.scatter(1, labels[:, None], float("-inf"))
                out.append(picked - torch.logsumexp(others, 1))
    return torch.cat(out).numpy()


@ray.remote
def _retrain(
    job: dict[str, Any], work: list[tuple[list[int], int]], threads: int
) -> list[np.ndarray]:
    """Retrainings (rows, seed) in turn -> each model's outputs on data.query (Q,)."""
    torch.set_num_threads(threads)
    cfg = JobConfig.from_cfg(job)
    task, query, train = build_task(cfg), build_dataset(cfg, "query"), retrain.retrainer(cfg)
    return [model_outputs(train(rows, seed), task, query, cfg.lds.output) for rows, seed in work]


def lds_store(job: JobConfig) -> Store:
    """Where ground truth lives: lds.url, else `<store.url>/lds`."""
    url = job.lds.url or f"{job.store.url.rstrip('/')}/lds"
    return open_store(job, url)


def check_buildable(job: JobConfig) -> None:
    """Refuse, before any retraining, a recipe or query set that cannot give LDS outputs."""
    retrain.check(job)
    reader = output_reader(build_task(job))
    try:  # one query item, before any retraining: is there a label to read?
        _, labels = reader.split(reader.collate([build_dataset(job, "query")[0]]))
        problem = None if torch.is_tensor(labels) else f"its label is a {type(labels).__name__}"
    except (KeyError, IndexError, TypeError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        raise ConfigError(
            f"LDS outputs are log p(true label), but data.query items give no label to read "
            f"({problem}); use (input, label) items or dicts with input/label keys, or a "
            f"task with logits(model, batch) and split(batch) -> (inputs, labels)"
        )


def _chunks(items: list[Any], slots: int) -> list[list[Any]]:
    """A few chunks per parallel slot: workers import once, progress still moves."""
    n = max(1, min(len(items), 4 * slots))
    return [items[i::n] for i in range(n)]


def build(job: JobConfig, raw: dict[str, Any], masks: np.ndarray) -> tuple[np.ndarray, float]:
    """Retrain every (subset, seed) in Ray tasks: outputs (s, m, Q) and wall seconds.

    Ray must be connected; `raw` is the resolved job config shipped to each task.
    """
    lds = job.lds
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // lds.cpus_per_task))
    members = [(r, j) for r in range(lds.seeds) for j in range(lds.subsets)]
    remote = _retrain.options(num_cpus=lds.cpus_per_task)
    threads = max(1, int(lds.cpus_per_task))
    t0 = time.perf_counter()
    refs = {}
    for chunk in _chunks(members, slots):
        work = [
            (np.flatnonzero(masks[j]).tolist(), training_seed(lds.seed, j, r)) for r, j in chunk
        ]
        refs[remote.remote(raw, work, threads)] = chunk
    outputs: dict[tuple[int, int], np.ndarray] = {}
    pending = list(refs)
    with tqdm(total=len(members), desc="LDS retraining", unit="model", dynamic_ncols=True) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            outputs.update(zip(refs[done[0]], ray.get(done[0]), strict=True))
            bar.update(len(refs[done[0]]))
    stacked = np.stack(
        [np.stack([outputs[(r, j)] for j in range(lds.subsets)]) for r in range(lds.seeds)]
    )
    return stacked, time.perf_counter() - t0


def _to_parquet(masks: np.ndarray, y_seeds: np.ndarray) -> bytes:
    s, m, q = y_seeds.shape
    y = y_seeds.mean(0)
    table = pa.table(
        {
            "subset": pa.array(np.arange(m), pa.int32()),
            "rows": pa.array([np.flatnonzero(row).astype(np.int32) for row in masks]),
            "y": pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1)), q),
            "y_seeds": pa.FixedSizeListArray.from_arrays(
                pa.array(y_seeds.transpose(1, 0, 2).reshape(-1)), s * q
            ),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def load(store: Store, key: str) -> GroundTruth | None:
    """The ground truth cached under `key`, or None if it was never completed."""
    if not store.exists(f"{key}/{SPEC}"):
        return None
    spec = json.loads(store.read_bytes(f"{key}/{SPEC}"))
    table = table_from_bytes(store.read_bytes(f"{key}/{FILE}"))
    m, q, s, n = spec["subsets"], spec["queries"], spec["seeds"], spec["n_train"]
    masks = np.zeros((m, n), dtype=bool)
    for j, rows in enumerate(table["rows"].to_pylist()):
        masks[j, rows] = True
    y = table["y"].combine_chunks().flatten().to_numpy().reshape(m, q)
    y_seeds = table["y_seeds"].combine_chunks().flatten().to_numpy().reshape(m, s, q)
    return GroundTruth(key, masks, y, y_seeds.transpose(1, 0, 2), spec["query_keys"], spec)


def lookup(job: JobConfig) -> GroundTruth | None:
    """The job's ground truth if it was already built (no training, no Ray)."""
    return load(lds_store(job), digest(recipe(job)))


def location(job: JobConfig) -> str:
    """The URL where the job's ground truth is, or would be once built (for messages)."""
    return lds_store(job).url_of(digest(recipe(job)))


def ensure(job: JobConfig, raw: dict[str, Any]) -> tuple[GroundTruth, bool]:
    """The job's ground truth, built (on the connected Ray) only if not cached.

    Returns (ground truth, whether it was built now).
    """
    spec = recipe(job)
    key = digest(spec)
    store = lds_store(job)
    cached = load(store, key)
    if cached is not None:
        log.info("LDS ground truth %s found in %s: no retraining", key, store.url_of(key))
        return cached, False
    check_buildable(job)
    train, query = build_dataset(job, "train"), build_dataset(job, "query")
    masks = subset_masks(len(train), job.lds.subsets, job.lds.fraction, job.lds.seed)
    log.info(
        "LDS ground truth %s: retraining %d subsets x %d seeds on %d of %d rows",
        key,
        job.lds.subsets,
        job.lds.seeds,
        int(masks[0].sum()),
        len(train),
    )
    y_seeds, seconds = build(job, raw, masks)
    if not np.isfinite(y_seeds).all():
        raise GroundTruthError(
            f"retrained models gave non-finite outputs for ground truth {key}: check "
            f"model.lr / model.epochs (a diverging recipe) or use lds.output=logprob"
        )
    store.write_bytes(f"{key}/{FILE}", _to_parquet(masks, y_seeds))
    meta = {
        **spec,
        "digest": key,
        "n_train": len(train),
        "queries": len(query),
        "query_keys": [sample_key(query, i) for i in range(len(query))],
        "train_seconds": round(seconds, 3),
    }
    store.write_bytes(f"{key}/{SPEC}", json.dumps(meta, indent=1).encode())
    return load(store, key), True
