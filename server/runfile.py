"""`fl-server --config run.toml`: a run's settings in one file; flags given too override it.

    [run]                       # any fl-server flag, without its dashes: --round-timeout is round_timeout
    task = "my_task.py"
    rounds = 10
    clients = 4
    eval_every = 1

    [task]                      # the task's own parameters (its Task.params), with their types
    learning_rate = 0.001
    hidden_units = 32

Relative paths in [run] are taken from the run file's folder, so a run file and its task can
travel together. Unknown keys are refused with the list of known ones.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedgrpc.common.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: [run] keys that name files: resolved from the run file's folder.
PATH_KEYS = ("out", "tls_cert", "tls_key", "client_ca", "tokens", "spool_dir", "init_model", "tensorboard")
#: [run] keys that may name files, or something else (an installed task, "cifar10" data).
MAYBE_PATH_KEYS = ("task", "data")
#: Flags a run file may not set: they are about one start, not the run.
NOT_IN_RUN_FILE = ("config", "hash_token", "help", "param")


def load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The [run] settings (by argparse dest) and the [task] parameters of a run file."""
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--config {path} cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"run", "task"})
    if unknown:
        raise ConfigError(f"--config {path}: unknown table(s) {unknown}; a run file has [run] and [task]")
    run, task = document.get("run", {}), document.get("task", {})
    if not isinstance(run, dict) or not isinstance(task, dict):
        raise ConfigError(f"--config {path}: [run] and [task] must be tables")
    return {key.replace("-", "_"): _resolved(path.parent, key, value) for key, value in run.items()}, task


def apply(parser: argparse.ArgumentParser, settings: Mapping[str, Any], source: Path) -> None:
    """Make a run file's settings the parser's defaults (so flags still override them)."""
    known = {action.dest for action in parser._actions} - set(NOT_IN_RUN_FILE)
    for key in settings:
        if key not in known:
            raise ConfigError(
                f"--config {source}: [run] has no setting {key!r}; settings are fl-server's flags "
                f"without dashes: {', '.join(sorted(known))}"
            )
    # argparse converts string defaults with the flag's type, and takes TOML's numbers as they are.
    parser.set_defaults(**settings)


def _resolved(folder: Path, key: str, value: Any) -> Any:
    key = key.replace("-", "_")
    if not isinstance(value, str) or Path(value).is_absolute():
        return value
    candidate = folder / value
    if key in PATH_KEYS or (key in MAYBE_PATH_KEYS and candidate.exists()):
        return str(candidate)
    return value
