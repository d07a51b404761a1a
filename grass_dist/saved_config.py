"""The job's config as saved under `outputs/logs/<time>/.hydra/`, with credentials as `***`.

Hydra saves three files before a job starts: the composed config (`config.yaml`), its own
(`hydra.yaml`, which repeats the command line) and the command line's overrides
(`overrides.yaml`), mode 0644. Credentials belong in the environment (README: S3 credentials
through environment variables), but one given anyway, as `+store.storage_options.secret=...`
or in a preset, would be saved in plain text. So `conf/config.yaml` turns Hydra's own saving
off (`hydra.output_subdir: null`) and `SavedConfig`, a Hydra callback, writes the same three
files to the same folder with every credential replaced by `***`:

- under any `storage_options` node (nested ones such as `client_kwargs` included), the value
  of each key whose name has a word (split at `_` and `-`) in `CREDENTIAL_WORDS`: `key`,
  `secret`, `token`, `password`, `aws_access_key_id`, `aws_secret_access_key`,
  `aws_session_token`, `sas_token`, ...; `endpoint_url`, `region_name` or `anon` stay;
- in an override `<path>=<value>` whose path names such a key (also within Hydra's
  `override_dirname`, the overrides joined by commas), the value;
- the user and password of a URL that carries them (`s3://user:password@bucket/...`, which
  the job then refuses);
- anywhere else (a dict override `store.storage_options={key:...}`,
  `hydra.job.override_dirname`), every occurrence of such a value of 4 characters or more.

The job itself gets the config unchanged, and warns that its credentials were seen on the
command line or in a config file. A sweep (`-m`) has Hydra's sweeper save the whole sweep's
config to `<hydra.sweep.dir>/multirun.yaml` itself, before its first job starts; the
callback rewrites that file the same way as each job starts, and its launcher's log lines
(`#0 : <overrides>`) pass through `Scrubbed`, a logging filter on the launcher's logger.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from grass_dist.urls import userinfo

log = logging.getLogger(__name__)

REDACTED = "***"
CREDENTIAL_WORDS = frozenset({"key", "secret", "token", "password", "passwd", "credentials"})
_OPTIONS = "storage_options"
_MIN_SCRUBBED = 4  # shorter values are not replaced inside other strings (they are in keys)
_OVERRIDE = re.compile(r"^(?P<path>[~+]{0,2}[\w.\-/@]+)=(?P<value>.*)$", re.DOTALL)


def is_credential(name: str) -> bool:
    """Whether a storage option named `name` holds a credential (`aws_secret_access_key`)."""
    return bool(CREDENTIAL_WORDS & set(re.split(r"[_\-]", str(name).lower())))


def credentials(tree: Any, path: str = "", under: bool = False) -> dict[str, str]:
    """`{dotted path: value}` of every credential in a config tree (plain dicts and lists)."""
    found: dict[str, str] = {}
    if isinstance(tree, dict):
        for name, value in tree.items():
            where = f"{path}.{name}" if path else str(name)
            inside = under or name == _OPTIONS
            if under and is_credential(name) and isinstance(value, (str, int, float)):
                found[where] = str(value)
            else:
                found.update(credentials(value, where, inside))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found.update(credentials(value, f"{path}[{i}]", under))
    elif isinstance(tree, str) and "://" in tree:  # user:password@ in a URL (store.url)
        user, _, password = (userinfo(tree) or "").partition(":")
        found.update({f"{path} (its user)": user} if user else {})
        found.update({f"{path} (its password)": password} if password else {})
    return found


def redact(tree: Any, secrets: list[str], under: bool = False) -> Any:
    """A copy of `tree` (plain dicts, lists, scalars) with credentials as `***`; `secrets`
    are the values scrubbed from every other string."""
    if isinstance(tree, dict):
        out = {}
        for name, value in tree.items():
            if under and is_credential(name) and isinstance(value, (str, int, float)):
                out[name] = REDACTED
            else:
                out[name] = redact(value, secrets, under or name == _OPTIONS)
        return out
    if isinstance(tree, list):
        return [redact(value, secrets, under) for value in tree]
    if isinstance(tree, str):
        return _scrub(tree, secrets)
    return tree


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= _MIN_SCRUBBED:
            text = text.replace(secret, REDACTED)
    # An override, or Hydra's override_dirname (overrides joined by commas).
    return ",".join(_scrub_override(part) for part in text.split(","))


def _scrub_override(text: str) -> str:
    override = _OVERRIDE.match(text)
    if override:
        parts = override["path"].lstrip("~+").split(".")
        if _OPTIONS in parts[:-1] and is_credential(parts[-1]):
            return f"{override['path']}={REDACTED}"
    return text


class SavedConfig(Callback):
    """Writes `config.yaml`, `hydra.yaml` and `overrides.yaml` as Hydra would, into
    `<hydra.runtime.output_dir>/<subdir>`, with credentials as `***` (`subdir` None: none)."""

    def __init__(self, subdir: str | None = ".hydra") -> None:
        self.subdir = subdir

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The launcher logs each job's overrides through its module's logger (Hydra
        # reconfigures the handlers around every job, but leaves this logger's filters).
        launcher = logging.getLogger(str(config.hydra.launcher._target_).rpartition(".")[0])
        for old in [f for f in launcher.filters if isinstance(f, Scrubbed)]:
            launcher.removeFilter(old)
        tree = OmegaConf.to_container(config, resolve=False)
        launcher.addFilter(Scrubbed(list(_found(tree).values())))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        tree = OmegaConf.to_container(config, resolve=False)
        found = _found(tree)
        if self.subdir is not None:
            folder = Path(config.hydra.runtime.output_dir) / self.subdir
            folder.mkdir(parents=True, exist_ok=True)
            clean = redact(tree, list(found.values()))
            files = {
                "config.yaml": {k: v for k, v in clean.items() if k != "hydra"},
                "hydra.yaml": {"hydra": clean["hydra"]},
                "overrides.yaml": clean["hydra"]["overrides"]["task"],
            }
            for name, part in files.items():
                (folder / name).write_text(OmegaConf.to_yaml(OmegaConf.create(part)))
        if config.hydra.mode == RunMode.MULTIRUN:
            _redact_file(Path(config.hydra.sweep.dir) / "multirun.yaml", list(found.values()))
        if found:
            given = list(config.hydra.overrides.task)
            log.warning(_warning(sorted(found), redact(given, list(found.values())) != given))


def _found(tree: dict[str, Any]) -> dict[str, str]:
    """The credentials of a job's config tree (its own part, not Hydra's)."""
    return credentials({k: v for k, v in tree.items() if k != "hydra"})


class Scrubbed(logging.Filter):
    """Rewrites each record's message with the credentials as `***`: the given values, and
    any `<...storage_options...credential>=<value>` override among its words."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        said = record.getMessage()
        clean = " ".join(_scrub(word, self.secrets) for word in said.split(" "))
        if clean != said:
            record.msg, record.args = clean, None
        return True


def _redact_file(path: Path, secrets: list[str]) -> None:
    """Rewrite the saved config at `path` (if any) with its credentials, and `secrets`
    wherever they occur, as `***`."""
    if not path.exists():
        return
    tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    clean = redact(tree, sorted({*secrets, *_found(tree).values()}))
    if clean != tree:
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(clean)))


def _warning(paths: list[str], on_command_line: bool) -> str:
    source = (
        "on the command line, which other users of this machine (ps), the shell's history "
        "and a Ray dashboard show"
        if on_command_line
        else "in a config file"
    )
    return (
        f"{', '.join(paths)}: credentials given {source}. The job uses them and the config "
        f"it saves (.hydra/ under its log folder) has them as {REDACTED}, but credentials "
        "belong in the environment of every node: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(and AWS_SESSION_TOKEN), or AWS_PROFILE (README: S3 credentials through environment "
        "variables)."
    )
