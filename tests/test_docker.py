"""docker/ and README's cluster section stay in step with the code, without a Docker engine.

Checked here: the Ray and torch versions of docker/Dockerfile equal pyproject's and the
Makefile's pins; the image runs as a non-root user, bakes in no secret and copies only what
.dockerignore lets through; docker/compose.yaml has the documented topology (a head with
``--num-cpus=0``, exactly two workers, one SeaweedFS S3 service, every port on 127.0.0.1);
and every command, flag, Python module, config preset and override named by the compose
file, the Dockerfile, docker/.env.example and README's "Run on a cluster" section exists
(Ray's own CLI parser checks the ``ray`` flags, Hydra's compose API the overrides).

Not checked here: that the images build and the containers start (no Docker engine on CI).
The topology the compose file wires together, a head node with zero CPUs plus two worker
nodes, is exercised in-process by the cluster tests (``tests/test_cluster*.py``).
"""

from __future__ import annotations

import fnmatch
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
    # busybox tools of the SeaweedFS image (healthcheck, bucket creation)
    "wget": accept,
    "echo": accept,
    "grep": accept,
}


def check_command(argv: list[str], tmp_path: Path) -> None:
    """Fail unless argv's program is known and its subcommands, flags and modules exist."""
    assert argv[0] in CHECKS, f"unknown command {shlex.join(argv)}"
    CHECKS[argv[0]](argv[1:], tmp_path)


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_base_image_is_ray_at_the_pinned_version():
    args = dockerfile_args()
    assert args["RAY_VERSION"] == pinned("ray[")
    froms = [rest for word, rest in dockerfile_instructions() if word == "FROM"]
    assert froms == ["${BASE_IMAGE}"]
    ray = pinned("ray[")
    assert expand(args["BASE_IMAGE"], args) == f"rayproject/ray:{ray}-py311-cpu"
    floor = re.search(r">=\s*3\.(\d+)", pyproject()["project"]["requires-python"]).group(1)
    assert int(floor) <= 11, "the image's Python 3.11 must satisfy requires-python"


def test_dockerfile_torch_matches_the_makefile_pin():
    make_pin = re.search(r"(?m)^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text())
    assert dockerfile_args()["TORCH_VERSION"] == make_pin.group(1)


def test_dockerfile_runs_as_non_root_and_bakes_in_no_secret():
    steps = dockerfile_instructions()
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    for word, rest in steps:
        if word in ("ARG", "ENV"):
            name = rest.split("=")[0].split()[0]
            assert not re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", name), rest
        if word == "COPY":
            assert ".env" not in rest and "docker/" not in rest, rest


def dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins, a match on a parent dir counts."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in (p for p in patterns if p and not p.startswith("#")):
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        if any(segments_match(pattern.split("/"), pre.split("/")) for pre in prefixes):
            ignored = not negate
    return ignored


def segments_match(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(segments_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return (
        bool(parts)
        and fnmatch.fnmatchcase(parts[0], pattern[0])
        and segments_match(pattern[1:], parts[1:])
    )


def test_dockerfile_copies_what_dockerignore_lets_through():
    copied = []
    for word, rest in dockerfile_instructions():
        if word == "COPY":
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            copied += [s.rstrip("/") for s in sources if "*" not in s]  # globs are optional
    assert {"pyproject.toml", "grass_dist", "jobs", "conf"} <= set(copied)
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not dockerignored(src) and not dockerignored(f"{src}/x.py"), src
    for secret_or_bulk in ("docker/.env", ".venv/bin/python", "outputs/index/x", ".git/HEAD"):
        assert dockerignored(secret_or_bulk), secret_or_bulk
    assert dockerignored("grass_dist/__pycache__/x.pyc")


# ---------------------------------------------------------------- compose file


def ray_services(services: dict) -> dict[str, list[str]]:
    return {
        name: argv
        for name, svc in services.items()
        if (argv := service_argv(svc))[:2] == ["ray", "start"]
    }


def test_compose_topology_head_without_cpus_two_workers_one_s3_on_localhost():
    services = compose()["services"]
    ray_nodes = ray_services(services)
    heads = {n: a for n, a in ray_nodes.items() if flag(a, "--head") is not None}
    assert len(heads) == 1
    ((head, head_argv),) = heads.items()
    assert flag(head_argv, "--num-cpus") == "0" and flag(head_argv, "--block") == ""
    workers = {n: a for n, a in ray_nodes.items() if n != head}
    assert len(workers) == 2
    for argv in workers.values():
        assert flag(argv, "--address") == f"{head}:{flag(head_argv, '--port')}"
        assert flag(argv, "--block") == ""
    s3 = [
        n
        for n, s in services.items()
        if s.get("image", "").startswith("chrislusf/seaweedfs")
        and service_argv(s)[:2] == ["weed", "server"]
    ]
    assert len(s3) == 1 and "-s3" in service_argv(services[s3[0]])
    published = [p for svc in services.values() for p in svc.get("ports", [])]
    assert published and all(str(p).startswith("127.0.0.1:") for p in published), published
    dashboard = flag(head_argv, "--dashboard-port")
    assert f"127.0.0.1:{dashboard}:{dashboard}" in services[head]["ports"]


def shm_bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([bkmg]?)b?", size.lower()).groups()
    return int(number) * 1024 ** "bkmg".index(unit or "b")


def test_compose_ray_nodes_share_image_token_mode_and_s3_endpoint():
    services = compose()["services"]
    s3_name = next(n for n, s in services.items() if "-s3" in service_argv(s))
    s3_port = flag(service_argv(services[s3_name]), "-s3.port")
    for name, argv in ray_services(services).items():
        svc = services[name]
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert (COMPOSE.parent / svc["build"]["context"]).resolve() == ROOT
        assert svc["env_file"] == ".env" and svc["environment"]["RAY_AUTH_MODE"] == "token"
        assert svc["environment"]["AWS_ENDPOINT_URL"] == f"http://{s3_name}:{s3_port}"
        assert not set(SECRET_NAMES) & set(svc["environment"]), "secrets belong in .env"
        assert int(flag(argv, "--object-store-memory")) < shm_bytes(svc["shm_size"])


def test_compose_creates_the_bucket_of_the_s3_preset():
    bucket = OmegaConf.load(ROOT / "conf/store/s3.yaml").url.split("/")[2]
    services = compose()["services"]
    creators = [n for n, s in services.items() if "s3.bucket.create" in " ".join(service_argv(s))]
    assert len(creators) == 1
    script = service_argv(services[creators[0]])
    assert f"s3.bucket.create -name {bucket}" in " ".join(script)


def test_env_example_names_every_secret_with_placeholders_and_env_is_ignored():
    entries = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(SECRET_NAMES) <= set(entries) and entries["RAY_AUTH_MODE"] == "token"
    assert all(entries[name].startswith("replace-with-") for name in SECRET_NAMES)
    assert "docker/.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_compose_commands_exist(tmp_path):
    for svc in compose()["services"].values():
        argv = service_argv(svc)
        commands = shell_commands(argv[2]) if argv[:2] == ["/bin/sh", "-c"] else [argv]
        test = svc.get("healthcheck", {}).get("test", [])
        if test[:1] == ["CMD"]:
            commands.append(test[1:])
        for cmd in commands:
            check_command(cmd, tmp_path)


# ---------------------------------------------------------------- README's cluster section


def test_docs_and_file_comments_name_only_existing_commands_modules_and_presets(tmp_path):
    commands = markdown_commands()
    assert any("python -m jobs." in shlex.join(c) for c in commands)
    for path in (COMPOSE, DOCKERFILE, ENV_EXAMPLE):
        assert comment_commands(path), f"{path.name} shows no `#   command` usage line"
        commands += comment_commands(path)
    for cmd in commands:
        check_command(cmd, tmp_path)


def test_docs_inline_config_keys_exist(tmp_path):
    spans = re.findall(r"`([^`\n]+)`", cluster_doc())
    defaults = compose_cfg(tmp_path, small=False)
    groups = set(JobConfig.__dataclass_fields__)
    checked = 0
    for span in spans:
        if re.fullmatch(r"\+?[a-z_]+(\.[a-z_]+)*=\S+", span):
            check_overrides([span.replace("=...", "=x")], tmp_path)
            checked += 1
        elif re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", span) and span.split(".")[0] in groups:
            assert OmegaConf.select(defaults, span, default="<missing>") != "<missing>", span
            checked += 1
    assert checked >= 8


def test_docs_show_the_compose_cluster_example():
    commands = markdown_commands()
    assert ["docker", "compose", "-f", "docker/compose.yaml", "up", "--build"] in commands
    head = ray_services(compose()["services"])
    dashboard = next(flag(a, "--dashboard-port") for a in head.values() if "--head" in a)
    bucket = OmegaConf.load(ROOT / "conf/store/s3.yaml").url.split("/")[2]
    submits = [
        c
        for c in commands
        if c[:3] == ["ray", "job", "submit"]
        and option(c, "--address") == f"http://127.0.0.1:{dashboard}"
    ]
    assert submits, "no `ray job submit` to the compose head"
    job = submits[0][submits[0].index("--") + 1 :]
    assert job[:3] == ["python", "-m", "jobs.attribute"] and "cluster.address=auto" in job
    assert any(a.startswith(f"store.url=s3://{bucket}/") for a in job)


@pytest.mark.parametrize(
    "argv",
    [
        "python -m jobs.nope",
        "python -m jobs.attribute cluster=nope",
        "python -m jobs.attribute cluster.gpu_per_worker=1",
        "python -m jobs.attribute store.storage_options.endpoint_url=http://x:1",
        "ray start --num-cpu=0",
        "ray stat",
        "ray job submit --adress http://x -- python -m jobs.attribute",
        "ray job submit -- python -m jobs.attribute cluster.num_workers=two",
        "docker build -f docker/Dockerfile --build-arg NOPE=1 .",
        "docker build -f docker/Dockerfile --build-arg EXTRAS=nope .",
        "kubectl apply -f x.yaml",
    ],
)
def test_the_checks_reject_names_that_do_not_exist(argv, tmp_path):
    with pytest.raises(Exception):  # noqa: B017 - Hydra, click and assert failures alike
        check_command(shlex.split(argv), tmp_path)
