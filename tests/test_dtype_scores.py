"""Storage dtype of the index: the scores' error against a float32 index, per dtype."""

import numpy as np
import pytest

from grass_dist.compress import build_compressors
from grass_dist.config import CompressionConfig
from grass_dist.data import digits
from grass_dist.gradients.capture import resolve_layers
from grass_dist.gradients.computer import GradientComputer
from grass_dist.index import GradientIndex
from grass_dist.models.digits import digits_mlp
from grass_dist.runtime.scoring import ScoreOptions, score_records
from grass_dist.scoring.fisher_sum import FisherSum
from grass_dist.scoring.precondition import Preconditioner
from grass_dist.scoring.score import prepare_queries
from grass_dist.tasks.classifier import ClassificationTask
from tests.test_score import _assemble

# Unit roundoff: float16 2^-11 = 4.9e-4, bfloat16 2^-8 = 3.9e-3. Scores sum many rounded
# products, so their relative error sits near (not above) one roundoff; bounds allow 4x.
BOUNDS = {"float32": 0.0, "float16": 2e-3, "bfloat16": 1.6e-2}


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    model = digits_mlp(
        hidden=[32], epochs=10, n_train=300, cache_dir=str(tmp_path_factory.mktemp("c"))
    )
    comps = build_compressors(CompressionConfig(k=64), resolve_layers(model, None))
    computer = GradientComputer(model, ClassificationTask(), comps)
    train = computer.phi_rows(digits("train", 300, 40), range(300), batch_size=100)
    query = computer.phi_rows(digits("query", 300, 40), range(40), batch_size=40)
    return train, query


def _dense_scores(tmp_path, train, query, dtype: str, kind: str) -> np.ndarray:
    layers = [{"name": n, "k": int(x.shape[1])} for n, x in train.phi.items()]
    index = GradientIndex.create_or_open(str(tmp_path / dtype), {"layers": layers, "dtype": dtype})
    records = []
    for lo in range(0, 300, 128):
        hi = min(lo + 128, 300)
        block = {n: x[lo:hi] for n, x in train.phi.items()}
        records.append(
            index.write_shard(f"s{lo}", lo, hi, train.row_ids[lo:hi], train.keys[lo:hi], block)
        )
    index.commit(records)
    fisher = FisherSum({}, 0)
    for _, data in index.iter_committed():
        fisher = fisher + FisherSum.of(data.phi)
    pre = Preconditioner.from_fisher(fisher)
    prepared = prepare_queries(query.phi, kind, pre, 0.1)
    _, parts = score_records(
        index, records, prepared, ScoreOptions(topk=5, tile_rows=64), dense_dir="results/dtype/run"
    )
    return _assemble(index, parts["dense"]).astype(np.float64)


@pytest.mark.parametrize("kind", ["influence", "grad_dot"])
def test_score_error_per_storage_dtype(phi, tmp_path, kind):
    train, query = phi
    ref = _dense_scores(tmp_path / "ref", train, query, "float32", kind)
    for dtype, bound in BOUNDS.items():
        scores = _dense_scores(tmp_path, train, query, dtype, kind)
        rel = float(np.linalg.norm(scores - ref) / np.linalg.norm(ref))
        print(f"{kind} scores, index dtype {dtype}: relative error {rel:.2e} (bound {bound:.1e})")
        assert rel <= bound
        if dtype != "float32":
            assert rel > 0  # the dtype really was used
