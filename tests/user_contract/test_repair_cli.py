"""A corrupt shard found and repaired as a user meets it: `jobs.score` refuses the index
naming the shard and the command that recomputes it, and that command, run as written with
the job's settings, recomputes that shard alone."""

from __future__ import annotations

import json
import re

from grass_dist.index import GradientIndex
from tests.user_contract.conftest import run_job
from tests.user_contract.test_bad_input import _message, _overrides


def test_a_corrupt_shard_is_named_and_the_repair_it_names_recomputes_it(tmp_path, user_pkg):
    # A pool of two workers on two CPUs: the repair's scan runs on Ray tasks, which waited
    # for good for the CPUs that the job's early workers held (the command hung). (With the
    # driver computing shards as one of the two, one worker starts and leaves a CPU free.)
    given = [
        *(o for o in _overrides(user_pkg, tmp_path) if not o.startswith("cluster.num_workers")),
        "cluster.num_workers=2",
        "cluster.num_cpus=2",
        "cluster.driver_shard=false",
    ]
    built = run_job("index", *given, user=user_pkg, cwd=tmp_path, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    index = GradientIndex.open(str(tmp_path / "index"))
    record = min(index.committed().values(), key=lambda r: r.start)
    path = tmp_path / "index" / record.file
    path.write_bytes(path.read_bytes()[:100])  # a shard cut short

    refused = run_job("score", *given, user=user_pkg, cwd=tmp_path, timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    said = _message(refused.stderr)
    assert f"shard file {index.store.url_of(record.file)} is corrupt" in said
    assert "`python -m jobs.index index.repair=true`" in said
    assert f"its index {index.store.url_of('')} included" in said

    # A plain jobs.index skips committed shards, but says which files are gone or cut short
    # (it said nothing, and exited 0, for a file deleted outside its sampled data check).
    last = max(index.committed().values(), key=lambda r: r.start)
    (tmp_path / "index" / last.file).unlink()
    skipped = run_job("index", *given, user=user_pkg, cwd=tmp_path, timeout=300)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert (
        f"2 committed shard file(s) are missing or not of their committed size: shard "
        f"{record.shard_id} ({index.store.url_of(record.file)}: 100 bytes, not {record.nbytes}); "
        f"shard {last.shard_id} ({index.store.url_of(last.file)}: missing). This job skips "
        f"committed shards. Fix: recompute it with `python -m jobs.index index.repair=true`"
    ) in skipped.stderr

    repaired = run_job("index", *given, "index.repair=true", user=user_pkg, cwd=tmp_path,
                       timeout=300)  # fmt: skip
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    # The two starting workers hold both CPUs: the scan runs on them once they are ready,
    # rather than stop them (Ray can leave a starting actor's CPUs held) for Ray tasks.
    assert re.search(r"idle workers? runs? the stage's map calls", repaired.stderr)
    summary = json.loads(repaired.stdout)
    assert sorted(summary["repair"]["bad_shards"]) == sorted([record.shard_id, last.shard_id])
    assert summary["index"]["computed_shards"] == 0
    scored = run_job("score", *given, user=user_pkg, cwd=tmp_path, timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
