"""Parsers and command checkers for tests/test_docker.py: the Dockerfile, the compose
file and the shell commands in README's cluster section, checked without a Docker engine.
"""

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from omegaconf import OmegaConf

from grass_dist.config import JobConfig
from tests.conftest import ROOT, compose_cfg

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
ENV_EXAMPLE = ROOT / "docker" / ".env.example"
README = ROOT / "README.md"


def cluster_doc() -> str:
    """The README's "Run on a cluster" section."""
    text = README.read_text()
    start = text.index("## Run on a cluster")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


SECRET_NAMES = ("RAY_AUTH_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
WEED = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))


# ---------------------------------------------------------------- parsing helpers


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_args() -> dict[str, str]:
    """Default of every ARG (the first declaration wins, as before FROM)."""
    args: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ARG":
            name, _, default = rest.partition("=")
            args.setdefault(name, default)
    return args


def expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: expand(env[m.group(1)], env), value)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(requirement_prefix: str) -> str:
    """The ``==`` version pyproject pins for the dependency starting with the prefix."""
    for dep in pyproject()["project"]["dependencies"]:
        if dep.startswith(requirement_prefix):
            return dep.split("==")[1]
    raise AssertionError(f"pyproject pins no {requirement_prefix}")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service_argv(service: dict) -> list[str]:
    """The argv a compose service runs: entrypoint (if set) + command."""
    entry, cmd = service.get("entrypoint", []), service.get("command", [])
    split = [*(shlex.split(entry) if isinstance(entry, str) else entry)]
    return split + (shlex.split(cmd) if isinstance(cmd, str) else list(cmd))


def flag(argv: list[str], name: str) -> str | None:
    """The value of ``--name=value`` in argv (None when absent, '' for a bare flag)."""
    for tok in argv:
        if tok == name:
            return ""
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
    return None


def shell_commands(script: str) -> list[list[str]]:
    """Simple commands of a shell snippet, split at ``&&``, ``||``, ``;`` and ``|``."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands, current = [], []
    for tok in lexer:
        if tok in ("&&", "||", ";", "|", "&"):
            commands.append(current)
            current = []
        else:
            current.append(tok)
    return [c for c in [*commands, current] if c]


def comment_commands(path: Path) -> list[list[str]]:
    """Commands shown in a file's comments as ``#   command`` lines (continuations joined)."""
    lines = [m.group(1) for m in re.finditer(r"(?m)^#   +(.*)$", path.read_text())]
    return [cmd for line in _join(lines) for cmd in shell_commands(line)]


def _join(lines: list[str]) -> list[str]:
    out, buf = [], ""
    for line in lines:
        buf += line.rstrip("\\").rstrip() + " "
        if not line.rstrip().endswith("\\"):
            out.append(buf)
            buf = ""
    return out


def markdown_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", cluster_doc(), flags=re.S)
    assert blocks, "README's cluster section shows no bash commands"
    return [
        cmd
        for block in blocks
        for line in _join(block.splitlines())
        for cmd in shell_commands(line)
    ]


# ---------------------------------------------------------------- command checks


def check_ray(args: list[str], tmp_path: Path) -> None:
    """Parse `ray ...` with Ray's own click CLI (without running it)."""
    from ray.scripts.scripts import cli

    cmd, rest, name = cli, list(args), "ray"
    while isinstance(cmd, click.Group):
        assert rest, f"`{name}` needs a subcommand"
        sub = cmd.get_command(click.Context(cmd), rest[0])
        assert sub is not None, f"`{name} {rest[0]}` is not a Ray command"
        cmd, rest, name = sub, rest[1:], f"{name} {rest[0]}"
    try:
        ctx = cmd.make_context(name, list(rest))  # click consumes its argument list
    except click.ClickException as e:
        raise AssertionError(f"`{name} {shlex.join(rest)}`: {e.format_message()}") from None
    if ctx.params.get("entrypoint"):
        check_command(list(ctx.params["entrypoint"]), tmp_path)


def check_overrides(overrides: list[str], tmp_path: Path) -> None:
    """Hydra composes the shipped conf/ with these overrides and JobConfig accepts them."""
    cfg = compose_cfg(tmp_path, *overrides, small=False)
    JobConfig.from_cfg(OmegaConf.to_container(cfg, resolve=True))


def check_python(args: list[str], tmp_path: Path) -> None:
    if args[0] == "-c":
        compile(args[1], "<snippet>", "exec")
        return
    assert args[0] == "-m", f"python {shlex.join(args)}: run modules with -m"
    assert importlib.util.find_spec(args[1]) is not None, f"no module {args[1]}"
    if args[1].startswith("jobs."):
        check_overrides(args[2:], tmp_path)


def option(args: list[str], name: str) -> str:
    assert name in args, f"{shlex.join(args)}: expected {name}"
    return args[args.index(name) + 1]


def check_docker(args: list[str], tmp_path: Path) -> None:
    if args[0] == "build":
        assert ROOT / option(args, "-f") == DOCKERFILE and args[-1] == "."
        known = dockerfile_args()
        extras = pyproject()["project"]["optional-dependencies"]
        for i, tok in enumerate(args):
            if tok == "--build-arg":
                key, value = args[i + 1].split("=", 1)
                assert key in known, f"docker/Dockerfile has no ARG {key}"
                if key == "EXTRAS":
                    assert set(value.split(",")) <= set(extras), f"unknown extra in {value}"
                if key == "VARIANT":
                    assert re.fullmatch(r"cpu|gpu|cu\d+", value), f"VARIANT={value}"
    elif args[0] == "compose":
        assert ROOT / option(args, "-f") == COMPOSE
        assert args[args.index("-f") + 2] in ("up", "down"), shlex.join(args)
    else:
        raise AssertionError(f"docker {args[0]} is not used by these docs")


def check_weed(args: list[str], tmp_path: Path) -> None:
    assert args[0] in ("server", "shell"), f"weed {args[0]}"
    if WEED:  # the flags are checked against the binary when it is installed
        help_text = subprocess.run(
            [WEED, args[0], "-h"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
        ).stdout
        known = set(re.findall(r"(?m)^\s+(-[\w.]+)", help_text))
        for tok in args[1:]:
            assert tok.split("=")[0] in known, f"weed {args[0]} has no flag {tok}"


def check_source(args: list[str], tmp_path: Path) -> None:
    path = ROOT / args[0]
    assert path.exists() or path.with_name(path.name + ".example").exists(), args[0]


def check_cp(args: list[str], tmp_path: Path) -> None:
    assert (ROOT / args[0]).exists(), f"cp: no {args[0]}"


def check_set(args: list[str], tmp_path: Path) -> None:
    assert set(args) <= {"-a", "+a"}, f"set {args}"


def check_export(args: list[str], tmp_path: Path) -> None:
    assert all(re.fullmatch(r"[A-Z_]+=.*", a) for a in args), f"export {args}"


def accept(args: list[str], tmp_path: Path) -> None:
    """Programs whose arguments name nothing of this repository."""


CHECKS = {
    "ray": check_ray,
    "python": check_python,
    "docker": check_docker,
    "weed": check_weed,
    "cp": check_cp,
    ".": check_source,
    "set": check_set,
    "export": check_export,
    "chmod": accept,
    "mkdir": accept,
    # busybox tools of the SeaweedFS image (healthcheck, bucket creation)
    "wget": accept,
    "echo": accept,
    "grep": accept,
}


def check_command(argv: list[str], tmp_path: Path) -> None:
    """Fail unless argv's program is known and its subcommands, flags and modules exist."""
    assert argv[0] in CHECKS, f"unknown command {shlex.join(argv)}"
    CHECKS[argv[0]](argv[1:], tmp_path)
