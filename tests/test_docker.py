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
import re
import shlex

import pytest
from omegaconf import OmegaConf

from grass_dist.config import JobConfig
from tests.conftest import ROOT, compose_cfg

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from tests.docker_checks import (
    COMPOSE,
    DOCKERFILE,
    ENV_EXAMPLE,
    SECRET_NAMES,
    check_command,
    check_overrides,
    cluster_doc,
    comment_commands,
    compose,
    dockerfile_args,
    dockerfile_instructions,
    expand,
    flag,
    markdown_commands,
    option,
    pinned,
    pyproject,
    service_argv,
    shell_commands,
)

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
