"""README's bring-your-own package, as a reader copies it: the four files of its listing
written to a folder outside the repository, then its shell block run as written (train the
checkpoint, attribute, LDS) by bash, with the environment's `python` on PATH."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)


def _package_and_commands() -> tuple[dict[str, str], str]:
    """README's `my_pkg` listing ({path: source}) and the shell block that follows it."""
    blocks = _blocks(README.read_text())
    at = next(i for i, (lang, body) in enumerate(blocks) if body.startswith("# my_pkg/"))
    files = dict(re.findall(r"^# (my_pkg/\w+\.py)\n(.*?)(?=^# my_pkg/|\Z)", blocks[at][1],
                            flags=re.S | re.M))  # fmt: skip
    lang, shell = blocks[at + 1]
    assert lang == "bash" and "jobs.lds" in shell
    return files, shell


@pytest.mark.integration
def test_the_readme_package_and_its_commands_run_as_written(tmp_path):
    files, shell = _package_and_commands()
    assert sorted(files) == [f"my_pkg/{m}.py" for m in ("data", "models", "tasks", "train")]
    for rel, source in files.items():
        assert "grass_dist" not in source  # a user's package, as the README says
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(source)
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    ran = subprocess.run(
        ["bash", "-e", "-c", shell], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-4000:]
    # Both jobs printed their summaries (jobs.attribute's, then jobs.lds's JSON) on stdout.
    summaries = [json.loads(s) for s in re.findall(r"^\{\n.*?^\}$", ran.stdout, re.S | re.M)]
    attributed, validated = summaries
    assert attributed["index"]["rows"] == 300 and attributed["score"]["queries"] == 20
    assert (tmp_path / "outputs/index-mine/results/default/lds.json").exists()
    assert validated["ground_truth"]["subsets"] == 50  # lds.subsets' default, retrained
    lds = validated["results"]["default"]["all_queries"]
    assert lds["queries"] == 20 and 0 < lds["lds"] <= 1
