"""Every job command the documentation shows composes, validates and builds what it can.

The commands are collected from the files themselves, so a doc edit cannot drift from the
tests: fenced shell blocks and inline code of README.md and docs/*.md, `make run ARGS="..."`,
and the `#   python -m jobs...` example lines in the header of every conf/**/*.yaml. Each
one is composed with Hydra's compose API and validated with `JobConfig.from_cfg`; then the
parts that build in well under a second are built: the task, the training set (shipped data
only), the model's architecture (digits models with `epochs=0`, a randomly initialised
`hf_causal_lm`) and every layer's compressor for it. Commands that name a user's package
(`my_pkg`) or a remote store compose and validate only. The text-files example of
conf/data/text_files.yaml, which no other test runs, runs end to end on files written here.

README's Python snippets run against a finished job in tests/user_contract/test_ray_start.py,
whose job is README's own `ray job submit` command.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra.utils import instantiate

from grass_dist.compress import check_compressors
from grass_dist.config import JobConfig, resolve
from grass_dist.gradients.capture import resolve_layers
from grass_dist.index import GradientIndex
from grass_dist.scoring import results
from tests.conftest import CONF, ROOT, compose_cfg

JOB_NAMES = {p.stem for p in (ROOT / "jobs").glob("*.py") if p.stem != "__init__"}
_FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.M | re.S)
_INLINE = re.compile(r"`((?:python -m jobs\.|make run ARGS=)[^`]*)`")
# Placeholders a reader fills in, not overrides.
_PLACEHOLDERS = {"...", "[overrides]", "[hydra", "overrides]"}


@dataclass(frozen=True)
class Documented:
    where: str  # file:line, for the test id and the failure message
    job: str  # attribute, index, score, lds, serve
    overrides: tuple[str, ...]

    @property
    def user_code(self) -> bool:
        """Names a user's package or a store this machine cannot reach: compose only."""
        text = " ".join(self.overrides)
        return "my_pkg" in text or "s3://" in text or "/models/" in text


def jobs_in(line: str) -> list[tuple[str, list[str]]]:
    """(job, overrides) of every `python -m jobs.<job>` / `make run ARGS=` in a shell line."""
    if "-m jobs." not in line and "make run" not in line:
        return []
    line = line.replace("$PWD", "/tmp/checkout")
    tokens = shlex.split(line, comments=True)
    found = []
    segment: list[str] = []
    for token in [*tokens, "&&"]:
        if token not in ("&&", "||", ";", "|"):
            segment.append(token)
            continue
        for i, tok in enumerate(segment):
            if tok.endswith("python") and segment[i + 1 : i + 2] == ["-m"]:
                module = segment[i + 2] if len(segment) > i + 2 else ""
                job = module.removeprefix("jobs.")
                if module.startswith("jobs.") and job in JOB_NAMES:
                    found.append((job, segment[i + 3 :]))
                break
            if tok == "make" and segment[i + 1 : i + 2] == ["run"]:
                args = [a.removeprefix("ARGS=") for a in segment[i + 2 :] if a.startswith("ARGS=")]
                found.append(("attribute", shlex.split(" ".join(args))))
                break
        segment = []
    return found


def _shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) from fenced shell blocks and inline code, continuations joined."""
    out = []
    for m in _FENCE.finditer(text):
        if m.group(1) not in ("", "bash", "sh", "console"):
            continue
        first = text.count("\n", 0, m.start(2)) + 1
        block = m.group(2).split("\n")
        i = 0
        while i < len(block):
            start, line = i, block[i]
            while line.endswith("\\") and i + 1 < len(block):
                i += 1
                line = line[:-1] + " " + block[i].strip()
            out.append((first + start, line))
            i += 1
    for m in _INLINE.finditer(_FENCE.sub("", text)):
        out.append((0, m.group(1)))
    return out


def _header_lines(path: Path) -> list[tuple[int, str]]:
    """The `#   <command>` lines of a YAML file's leading comment."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.startswith("#"):
            if line.strip():
                break
            continue
        command = line.lstrip("#").strip()
        if "python -m jobs." in command or command.startswith("make run"):
            out.append((n, command))
    return out


def collect() -> list[Documented]:
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    lines = [(p, n, line) for p in sources for n, line in _shell_lines(p.read_text())]
    lines += [(p, n, line) for p in sorted(CONF.rglob("*.yaml")) for n, line in _header_lines(p)]
    found: dict[tuple[str, tuple[str, ...]], Documented] = {}
    for path, n, line in lines:
        for job, overrides in jobs_in(line):
            kept = [o for o in overrides if o not in _PLACEHOLDERS]
            where = f"{path.relative_to(ROOT)}:{n}" if n else str(path.relative_to(ROOT))
            for one in sweep(kept):
                found.setdefault((job, one), Documented(where, job, one))
    return list(found.values())


def sweep(overrides: list[str]) -> list[tuple[str, ...]]:
    """The jobs of a command line: itself, or for a sweep (`-m`) one job per combination of
    the values of each `key=a,b` (a comma outside brackets and quotes), as Hydra's basic
    sweeper runs them."""
    if "-m" not in overrides and "--multirun" not in overrides:
        return [tuple(overrides)]
    choices = []
    for given in (o for o in overrides if o not in ("-m", "--multirun")):
        key, eq, value = given.partition("=")
        values = _top_level_split(value) if eq else [value]
        choices.append([f"{key}={v}" for v in values] if len(values) > 1 else [given])
    return list(itertools.product(*choices))


def _top_level_split(value: str) -> list[str]:
    """`value` split at its commas outside brackets, braces and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(value):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(value[start:i])
            start = i + 1
    return [*parts, value[start:]]


COMMANDS = collect()


def test_commands_are_collected():
    # Guards the collector itself: each kind of source yields commands.
    wheres = {c.where.split(":")[0] for c in COMMANDS}
    assert "README.md" in wheres and "conf/data/text_files.yaml" in wheres
    assert any(w.startswith("docs/") for w in wheres)
    assert {c.job for c in COMMANDS} >= {"attribute", "index", "lds", "serve"}
    make_run = ("compression.k=64", "cluster.num_workers=3", "store.url=outputs/index-k64")
    assert any(c.overrides == make_run for c in COMMANDS)
    # README's sweep is its two jobs, each with its own store.
    swept = [c.overrides for c in COMMANDS if "run.name=k${compression.k}" in c.overrides]
    assert sorted(o[0] for o in swept) == ["compression.k=256", "compression.k=64"]
    assert sweep(["-m", "index.layers=[a,b]", "x=1,2"]) == [
        ("index.layers=[a,b]", "x=1"),
        ("index.layers=[a,b]", "x=2"),
    ]


def _cheap_model(job: JobConfig, tmp_path: Path):
    """The model's architecture when it builds in well under a second, else None."""
    node = dict(job.model)
    target = node["_target_"]
    if target in ("grass_dist.models.digits_mlp", "grass_dist.models.digits_cnn"):
        node.update(epochs=0, cache_dir=str(tmp_path / "cache"))  # architecture, untrained
    elif target != "grass_dist.hf.hf_causal_lm" or node.get("pretrained"):
        return None  # trained for minutes (tiny_gpt2), or a user's checkpoint
    return instantiate(node)


_SHIPPED_DATA = ("grass_dist.data.digits", "grass_dist.data.text.pydoc_topics")


@pytest.mark.parametrize(
    "cmd", COMMANDS, ids=[f"{c.where}:{c.job}:{' '.join(c.overrides)}" for c in COMMANDS]
)
def test_documented_command_composes_and_builds(tmp_path, cmd: Documented):
    cfg = compose_cfg(tmp_path, *cmd.overrides, small=False)
    job = JobConfig.from_cfg(cfg)
    if cmd.user_code:
        return
    task = instantiate(job.task)
    assert callable(getattr(task, "per_sample_loss", None))
    if job.data["train"]["_target_"] in _SHIPPED_DATA:
        assert len(instantiate(job.data["train"])) > 0
    model = _cheap_model(job, tmp_path)
    if model is not None:
        check_compressors(job.compression, resolve_layers(model, job.index.layers))


def _index_settings(job: dict) -> str:
    """What decides a job's index (grass_dist.build.fingerprint), as composed: model, task,
    training data, compression (not how it runs: jl_cache_mb), layers and storage dtype."""
    compression = {k: v for k, v in job["compression"].items() if k != "jl_cache_mb"}
    index = {k: job["index"][k] for k in ("layers", "dtype")}
    parts = [job["model"], job["task"], job["data"]["train"], compression, index]
    return json.dumps(parts, sort_keys=True, default=str)


def test_documented_commands_that_build_other_indexes_name_their_own_store(tmp_path):
    # Run one after another, as a reader tries them after `make run`: two commands that share
    # a store must build the same index, or the second is refused by its fingerprint.
    stores: dict[str, dict[str, list[str]]] = {}
    for cmd in COMMANDS:
        job = resolve(compose_cfg(tmp_path, *cmd.overrides, small=False))
        url = job["store"]["url"].replace(str(tmp_path), "<run.output_dir>")
        said = f"{cmd.where}: {' '.join(cmd.overrides) or '(defaults)'}"
        stores.setdefault(url, {}).setdefault(_index_settings(job), []).append(said)
    clashes = {url: list(v.values()) for url, v in stores.items() if len(v) > 1}
    assert not clashes, "\n".join(
        f"{url}, shared by commands that build {len(kinds)} different indexes:\n"
        + "\n".join(f"  index {i}: {' | '.join(c)}" for i, c in enumerate(kinds, 1))
        for url, kinds in clashes.items()
    )


def test_config_groups_table_lists_every_preset():
    """README's "Config groups" table names every preset in conf/, and no other."""
    text = (ROOT / "README.md").read_text().partition("## Config groups")[2]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]*) \|", text.partition("\n## ")[0], flags=re.M)
    documented = {group: set(re.findall(r"`(\w+)`", options)) for group, options in rows}
    ours = [g for g in CONF.iterdir() if g.is_dir() and g.name != "hydra"]  # not Hydra's own
    shipped = {g.name: {f.stem for f in g.glob("*.yaml")} for g in ours}
    assert documented == shipped


@pytest.mark.integration
def test_text_files_example_runs(tmp_path):
    """conf/data/text_files.yaml's plain-text command, as written, in a folder of notes."""
    pytest.importorskip("transformers")
    from pydoc_data.topics import topics

    (cmd,) = [
        c for c in COMMANDS if c.where.startswith("conf/data/text_files.yaml") and not c.user_code
    ]
    notes = tmp_path / "notes"
    notes.mkdir()
    for name in ("for", "while", "with"):
        (notes / f"{name}.txt").write_text(topics[name][:2000])
    queries = [
        {"prompt": 'The "for" statement is used to ', "completion": "iterate over a sequence"},
        {"prompt": 'The "with" statement is used to ', "completion": "wrap a block"},
    ]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    run = subprocess.run(
        [sys.executable, "-m", f"jobs.{cmd.job}", *cmd.overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    index = GradientIndex.open(str(tmp_path / "outputs" / "index-notes"))  # as the line names
    topk = results.load_table(index, "notes", "topk").to_pandas()  # run.name=notes
    assert sorted(set(topk["query_row"])) == [0, 1]
    # Every note is one document (long=truncate), keyed by its file name.
    assert set(topk["train_key"]) == {"for.txt:0", "while.txt:0", "with.txt:0"}
    assert (tmp_path / "outputs" / "report-notes.html").is_file()
