"""One declaration per setting: its name, type, default, range, help, and where it may be set.

A `Setting` is written once; the command-line parser, the run file's checks and the range
checks are all derived from it, so a value is held to the same rule wherever it comes from:

    flag text  --parse-->  typed value --check range-->  the run's value
    run file   --check type (TOML's own: true, 3, 0.5, "x")--> --check range--> a parser default

A run file's values become the parser's defaults, so a flag typed on the command line wins
and a default nobody typed never overrides the file. Every refusal is a ConfigError naming
the flag (or the run file and key), what was expected and what was given. A setting's
environment variable ($FL_TASK) stands in for its default, so it is read only when the flag
is absent, and a bad value is refused naming the variable. Settings that a
launcher (fl-local, fl-sim) reads from a run file too are declared here once, in RUN_SETTINGS;
each CLI adds its own beside them.

Every CLI has one shape: `--help` opens with "the essentials" (the settings of group "", about
ten), then the rest by topic, and a flag that takes a fixed set of names lists them; a refusal
is one line, `PROG: error: SENTENCE`, and exit status 2 (run_cli); a check that joins several
settings (go_together, require_tls) is written here once for all of them.

A run file (`--config run.toml`):

    [run]                       # any setting, without its dashes: --round-timeout is round_timeout
    task = "my_task.py"
    rounds = 10
    insecure = true             # TOML's own types: a boolean, not "true"
    [task]                      # the task's own parameters (its Task.params), with their types
    learning_rate = 0.001
    hidden_units = 32

Relative paths in [run] are taken from the run file's folder, so a run file and its task can
travel together. Unknown keys are refused with the list of known ones.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from .codec import DEFAULT_CHUNK_BYTES
from .compression import COMPRESSIONS
from .config import DEFAULT_TASK, RunSpec
from .errors import ConfigError, FedGrpcError
from .logs import FORMATS
from .partition import SCHEMES
from .words import type_name


@dataclass(frozen=True)
class Setting:
    """One setting. `name` is the run-file key and the parser's dest; the flag is `--name` with
    dashes. Bounds are inclusive (`low`, `high`) or exclusive (`above`, `below`); None is always allowed
    for a setting whose default is None ("not set")."""

    name: str
    kind: type  # bool, int, float, str or Path
    default: Any = None
    help: str = ""
    group: str = ""  # the --help section; "" is the essentials, listed first (keep it to about ten)
    low: float | None = None
    high: float | None = None
    above: float | None = None
    below: float | None = None
    choices: tuple[str, ...] = ()
    why: str = ""  # said after a range refusal, e.g. "(messages stay under 16 MiB)"
    metavar: str | None = None
    short: str | None = None  # e.g. "-v"
    env: str | None = None  # an environment variable that replaces the default when set
    flag: bool = True  # a command-line flag
    in_file: bool = True  # a run-file key
    maybe_path: bool = False  # a string that may name a file: resolved from the run file's folder if so
    repeat: bool = False  # a flag given several times collects a list
    flag_name: str | None = None  # the flag, when not --name with dashes (fl-client's --id)

    @property
    def option(self) -> str:
        return self.flag_name or "--" + self.name.replace("_", "-")

    def from_env(self) -> Any:
        """The environment's value when `env` is set there, else the default. Read only when the
        flag is absent, so an unusable variable never stops a run that gives the flag."""
        text = os.environ.get(self.env) if self.env else None
        if not text:
            return self.default
        try:
            return self.parse(text, f"${self.env}")
        except ConfigError as exc:
            raise ConfigError(f"{exc}; give {self.option}, or fix or unset ${self.env}") from None

    def parse(self, text: str, label: str | None = None) -> Any:
        """A flag's text as this setting's value, range checked."""
        label = label or self.option
        if self.kind is bool:
            raise ConfigError(f"{label} takes no value")
        try:
            value = Path(text) if self.kind is Path else self.kind(text)
        except ValueError:
            raise ConfigError(f"{label} must be {type_name(self.kind)}, got {text!r}") from None
        self.check_range(value, label)
        return value

    def check(self, value: Any, label: str) -> Any:
        """A value already typed (a run file's): of this setting's type exactly, in range.
        An int is taken for a number, and a string for a path."""
        kind = self.kind
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif kind is Path and isinstance(value, str):
            value = Path(value)
        elif type(value) is not kind:
            hint = " (true or false, without quotes)" if kind is bool else ""
            raise ConfigError(
                f"{label} must be {type_name(kind)}{hint}, got {value!r} ({type_name(type(value))})"
            )
        self.check_range(value, label)
        return value

    def check_range(self, value: Any, label: str) -> None:
        if value is None or isinstance(value, bool):
            return
        if self.choices and value not in self.choices:
            raise ConfigError(f"{label} must be one of {', '.join(self.choices)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{label} must be a finite number, got {value}")
        if not isinstance(value, int | float):
            return
        low_ok = self.low is None or value >= self.low
        high_ok = self.high is None or value <= self.high
        above_ok = self.above is None or value > self.above
        below_ok = self.below is None or value < self.below
        if low_ok and high_ok and above_ok and below_ok:
            return
        if self.low is not None and self.high is not None:
            rule = f"in {_number(self.low)}..{_number(self.high)}"
        else:
            parts = []
            if self.low is not None:
                parts.append(f"at least {_number(self.low)}")
            if self.above is not None:
                parts.append(f"above {_number(self.above)}")
            if self.high is not None:
                parts.append(f"at most {_number(self.high)}")
            if self.below is not None:
                parts.append(f"below {_number(self.below)}")
            rule = " and ".join(parts)
        why = f" {self.why}" if self.why else ""
        raise ConfigError(f"{label} must be {rule}{why}, got {value}")


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def by_name(settings: Iterable[Setting]) -> dict[str, Setting]:
    return {s.name: s for s in settings}


# -- the command line --------------------------------------------------------------------


#: The exit status of a run refused for its settings or stopped by one of our errors, on every CLI
#: (argparse's own, for a flag it cannot read, is 2 too).
EXIT_REFUSED = 2
#: The first --help section: the dozen flags a newcomer needs; the rest follow by topic.
ESSENTIALS = "the essentials"


EXIT_INTERRUPTED = 130


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """A CLI's exit status: `body`'s, or EXIT_REFUSED for one of our errors, said in one line on
    stderr (`fl-server: error: ...`, no traceback), or EXIT_INTERRUPTED for Ctrl-C."""
    try:
        return body()
    except FedGrpcError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def build_parser(
    settings: Sequence[Setting],
    *,
    prog: str,
    description: str,
    first: str = ESSENTIALS,
    groups: Mapping[str, str] | None = None,
    raw_description: bool = False,
    usage: str | None = None,
) -> argparse.ArgumentParser:
    """A parser with one flag per flag setting. Sections come in the order their settings first
    appear, the settings of group "" (the essentials) first of all; `groups` gives a section's
    title (its key otherwise)."""
    parser = _Parser(
        prog=prog,
        usage=usage,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter if raw_description else argparse.HelpFormatter,
    )
    sections: dict[str, Any] = {"": parser.add_argument_group(first)}
    for setting in settings:
        if not setting.flag:
            continue
        if setting.group not in sections:
            title = (groups or {}).get(setting.group, setting.group)
            sections[setting.group] = parser.add_argument_group(title)
        _add_flag(sections[setting.group], setting)
    return parser


class _FromEnv:
    """The parser's default for a setting with `env`: replaced after parsing by the
    environment's value (or the declared default), only when the flag was not given."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting

    def __str__(self) -> str:  # what --help shows for %(default)s
        return str(self.setting.default)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reads the environment defaults of the flags not given, and says
    its own refusals (an unknown flag, a missing value) as ConfigErrors: in one line, as every
    other refusal, not after a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        for name, value in vars(parsed).items():
            if isinstance(value, _FromEnv):
                setattr(parsed, name, value.setting.from_env())
        return parsed, extras


def _add_flag(section: Any, setting: Setting) -> None:
    names = [setting.short, setting.option] if setting.short else [setting.option]
    options: dict[str, Any] = {"dest": setting.name, "help": _help(setting)}
    default = _FromEnv(setting) if setting.env else setting.default
    if setting.kind is bool:
        options.update(action="store_true", default=default)
    else:
        # The choices are checked by setting.parse, with the run file's message; argparse only
        # shows them, in the help.
        metavar = setting.metavar or (setting.name.upper() if setting.choices else None)
        options.update(default=default, type=setting.parse, metavar=metavar)
        if setting.repeat:
            options.update(action="append", default=[])
    section.add_argument(*names, **options)


def _help(setting: Setting) -> str:
    """A flag's help; one that takes a fixed set of names lists them, whatever its help says."""
    if not setting.choices:
        return setting.help
    names = ", ".join(setting.choices)
    if "%(choices)s" in setting.help:
        return setting.help.replace("%(choices)s", names)
    return f"{setting.help} (one of: {names})"


def typed_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The dests of the flags actually typed in `argv`, as argparse reads them (abbreviations
    too): parsed once more with every default suppressed, so only typed values are set."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(namespace))


# -- checks that join several settings, written once for every CLI ----------------------------


def go_together(given: Mapping[str, object]) -> None:
    """Refuse some of `given` (flag -> value, None when not given) set without the others."""
    missing = [flag for flag, value in given.items() if value is None]
    if missing and len(missing) < len(given):
        raise ConfigError(f"{' and '.join(given)} go together")


def require_tls(tls: bool, insecure: bool, *, give: str, without: str) -> None:
    """Plain text only when asked for by name: no TLS and no --insecure is refused, saying
    what to `give` for TLS and how to go `without` it."""
    if not tls and not insecure:
        raise ConfigError(f"no TLS: {give}, or {without} without TLS on a network you trust")


# -- settings every side of a run shares ---------------------------------------------------

_RUN = "the run"
_SPEC = RunSpec()

CONFIG = Setting(
    "config", Path, None, in_file=False, metavar="RUN.toml",
    help="a run file: [run] holds any of these flags without dashes; flags given too override it",
)  # fmt: skip
TASK = Setting(
    "task", str, DEFAULT_TASK, env="FL_TASK", maybe_path=True,
    help="a task file (my_task.py), module:attribute, an installed task's name, or a saved model "
    "(model.keras: a server of training scripts) (default: $FL_TASK, else cifar10, the reference job)",
)  # fmt: skip
DATA = Setting(
    "data", str, None, env="FL_DATA", maybe_path=True,
    help="what the task reads; {id} in it becomes each client's id (data/site_{id}.csv: every "
    "client its own file) (cifar10: a folder, .tar.gz or .npz; default $FL_DATA, else the Keras download)",
)  # fmt: skip
ROUNDS = Setting(
    "rounds", int, _SPEC.rounds, low=1, metavar="N", help="federated rounds (default %(default)s)"
)
CLIENTS = Setting(
    "clients", int, _SPEC.num_clients, low=1, metavar="N",
    help="clients of the run, ids 1..N (default %(default)s)",
)  # fmt: skip
CLIENTS_PER_ROUND = Setting(
    "clients_per_round", int, None, group=_RUN, low=1, metavar="K",
    help="train a seeded sample of K ready clients each round (default: all of them)",
)  # fmt: skip

#: Settings both fl-server and fl-client have, declared once; each CLI places them (`group`).
CHUNK_KB = Setting(
    "chunk_kb", int, DEFAULT_CHUNK_BYTES >> 10, low=1, high=8 << 10, why="(messages stay under 16 MiB)",
    help="size of the weight chunks sent (default %(default)s KiB)",
)  # fmt: skip
VERBOSE = Setting("verbose", bool, False, short="-v", help="debug lines too")
LOG_FORMAT = Setting(
    "log_format", str, "text", choices=FORMATS, help="log lines for people or one JSON object a line"
)

RUN_SETTINGS = (
    TASK,
    DATA,
    ROUNDS,
    CLIENTS,
    CLIENTS_PER_ROUND,
    Setting("batch_size", int, _SPEC.batch_size, group=_RUN, low=1, help="(default %(default)s)"),
    Setting("local_epochs", int, _SPEC.local_epochs, group=_RUN, low=1, help="(default %(default)s)"),
    Setting(
        "partition",
        str,
        _SPEC.partition,
        group=_RUN,
        metavar="SCHEME",
        help=f"how stand-in federations cut one dataset: {', '.join(SCHEMES)} (default %(default)s)",
    ),
    Setting("partition_seed", int, _SPEC.partition_seed, group=_RUN, low=0, help="seed of the client shards"),
    Setting(
        "compression",
        str,
        _SPEC.compression,
        group=_RUN,
        choices=COMPRESSIONS,
        help="how clients send updates: %(choices)s (fp16 halves the bytes, int8 quarters them)",
    ),
)


def site_data(data: str | None, client_id: int) -> str | None:
    """A client's data: `{id}` in the operator's `--data` becomes the client's id."""
    return None if data is None else data.replace("{id}", str(client_id))
