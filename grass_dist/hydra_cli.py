"""What Hydra itself prints and refuses on a `jobs/` command line, before any job runs.

Hydra's printing flags (`--cfg job`, `--help`, `--info`) print the command's output, which
`launch.cli` leaves on stdout (`prints`); Hydra's refusals of a command line (an unknown
preset or key, a value of the wrong type, an argument it cannot read) end with the one
`error:` paragraph every refused job ends with, naming the fix (`say_the_fix`).
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable

from grass_dist.config_help import setting_help, unknown_setting

# Hydra's flags that print and run no job: what they print is the command's output
# (`python -m jobs.index --cfg job > job.yaml`), on stdout, each line once.
PRINTING = frozenset(
    ("--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i")
    + ("--shell-completion", "-sc")
)


def prints(args: list[str]) -> bool:
    """Whether the command line `args` asks Hydra to print something instead of a job."""
    return any(a.split("=", 1)[0] in PRINTING for a in args)


def say_the_fix(refusal: BaseException) -> None:
    """After Hydra's `refusal` of a command line (its own text, printed above): the one
    `error:` paragraph every refused job ends with, naming the fix, where there is one."""
    said = [str(x) for x in (refusal, refusal.__cause__) if x]  # its reason, where it has one
    override = getattr(refusal, "override", None)  # an argument it could not read
    if override is not None and not said[0].startswith("Error parsing override"):
        said.insert(0, f"Error parsing override '{override}'")
    line = explain("\n".join(said))
    if line is not None:
        print(f"error: {line}", file=sys.stderr)


def explain(message: str) -> str | None:
    """What to do about Hydra's refusal `message`: a preset that is none (with the group's
    presets), a value of the wrong type (with the setting's help), a key Hydra could not
    override, an argument it could not read, a `+` on a key that is there, a value it could
    not tell a list, a string or a sweep in (`_EXPLAINED`). Hydra's advice to add a key with
    `+` is right for the free-form nodes (model, data, task), but a misspelt setting would
    only be refused again."""
    for pattern, say in _EXPLAINED:
        found = re.search(pattern, message)
        line = say(found, message) if found is not None else None
        if line is not None:
            return line
    return None


def _given(key: str) -> str | None:
    """The value the command line gave `key` (KEY=VALUE, +KEY=..., ~KEY=...), if any."""
    given = [a.split("=", 1)[1] for a in sys.argv[1:] if a.lstrip("+~").startswith(key + "=")]
    return given[0] if given else None


def _no_preset(found: re.Match, message: str) -> str:
    group, name = found.groups()
    options = re.findall(r"^\t(\S+)$", message.partition("Available options")[2], re.M)
    near = difflib.get_close_matches(name, options, 1)
    meant = f" (did you mean {group}={near[0]}?)" if near else ""
    said = f"{group}={name} is not a preset of {group}{meant}" if name else f"{group}= names none"
    return f"{said}; its presets are {', '.join(options)} (the files of conf/{group}/)"


def _not_overridden(found: re.Match, message: str) -> str | None:
    if "defaults list" in message:
        return None
    key = found.group(1)
    added = re.search(r"To append to your config use (\+\S+)", message)
    return unknown_setting(key, _given(key)) or (
        f"{key} is not in the config yet: its node takes free-form keys (the arguments of "
        f"its _target_), added with a + as Hydra says: {added.group(1) if added else '+' + key}"
    )


# Hydra's refusals, each a pattern of its text and what to say about it (found, message).
_EXPLAINED: tuple[tuple[str, Callable[[re.Match, str], str | None]], ...] = (
    (r"Could not find '([^'/]+)/([^']*)'", _no_preset),
    (
        r"Error merging override ([^=\s]+)=(.*)\n(.+)",
        lambda found, _: (
            f"{found[1]}={found[2]} is refused ({found[3].strip()}); {setting_help(found[1])}"
        ),
    ),
    (r"Could not override '([^']+)'", _not_overridden),
    (
        r"Error parsing override '(.*)'\n(.*)",
        lambda found, _: (
            f"Hydra cannot read the argument {found[1]!r} ({found[2].strip()}): each one is "
            "KEY=VALUE, e.g. compression.k=64, a list index.layers=[fc1,fc2], a value with "
            "spaces or commas in quotes (\"run.name='a b'\"); +KEY=VALUE adds a key, ~KEY "
            "removes one"
        ),
    ),
    (
        r"An item is already at '([^']+)'",
        lambda found, _: (
            f"+{found[1]} adds a key, and {found[1]} is already in the config: set it without "
            f"the +, {found[1]}={_given(found[1]) or '...'}"
        ),
    ),
    (
        r"Ambiguous value for argument '([^=']+)=(.*)'",
        lambda found, _: (
            f"{found[1]}={found[2]} is a list, a string or a sweep: write {found[1]}=[{found[2]}] "
            f"for a list, \"{found[1]}='{found[2]}'\" for one string, or add -m (--multirun) to "
            "run one job per value"
        ),
    ),
)
