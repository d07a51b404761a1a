"""gc with no grace period, racing a writer process that writes and commits shards, on a local
directory and on a real S3 server: committed files all survive, all garbage goes."""

from __future__ import annotations

import multiprocessing as mp

from grass_dist.index import GradientIndex, ManifestLog, Store
from grass_dist.index.gc import collect
from tests.s3 import committer


def test_gc_racing_a_writer_never_removes_a_committed_file(backend, capsys):
    opts, shards = backend.storage_options, 12
    index = GradientIndex.create_or_open(
        backend.url, {"layers": [{"name": committer.LAYER, "k": committer.K}]}, opts
    )
    rows = list(range(3))
    phi = committer.phi_of(99)
    planted = [index.write_shard("w000", 0, 3, rows, ["k"] * 3, phi) for _ in range(3)]
    ctx = mp.get_context("spawn")  # fresh interpreters: never fork a process running Ray
    stats = ctx.Array("q", 2)  # commits refused (file collected), bytes written
    writer = ctx.Process(target=committer.write_and_commit, args=(backend.url, opts, shards, stats))
    writer.start()
    reports = []
    while writer.is_alive():
        reports.append(collect(Store(backend.url, opts), grace_s=0))
    writer.join(120)
    assert writer.exitcode == 0
    reports.append(collect(Store(backend.url, opts), grace_s=0))

    state = ManifestLog(Store(backend.url, opts)).state()
    assert sorted(state.shards) == [f"w{i:03d}" for i in range(shards)]
    for record in state.shards.values():
        index.read(record)  # present, with the sha256 the manifest recorded
    left = index.store.walk("shards")
    assert set(left) == {rec.file for rec in state.shards.values()}  # no garbage left
    reclaimed = sum(r.bytes_reclaimed for r in reports)
    committed = sum(rec.nbytes for rec in state.shards.values())
    assert reclaimed == sum(r.nbytes for r in planted) + stats[1] - committed
    assert len(reports) > 2  # gc ran while the writer wrote and committed
    with capsys.disabled():
        print(
            f"\n[{backend.name}] gc: {len(reports)} runs, {sum(r.removed for r in reports)} files "
            f"and {reclaimed} bytes reclaimed, {stats[0]} commits refused (file collected)"
        )
