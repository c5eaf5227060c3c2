"""Run files: a TOML file's [run] table as the defaults of a command's flags, each value checked
against the same declaration as its flag (fedgrpc.common.settings), and its [task] table for the
task's parameters. Paths in a run file are read from the file's folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .settings import Setting, by_name, typed_flags

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib


def read_run_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The [run] and [task] tables of a TOML run file, as written (keys with - become _)."""
    document = _document(path)
    run, task = document.get("run", {}), document.get("task", {})
    if not isinstance(run, dict) or not isinstance(task, dict):
        raise ConfigError(f"--config {path}: [run] and [task] must be tables")
    return {key.replace("-", "_"): value for key, value in run.items()}, task


def read_rounds_table(path: Path) -> dict[str, Any]:
    """A run file's [rounds] table: per-round client settings (fedgrpc.server.round_settings)."""
    rounds = _document(path).get("rounds", {})
    if not isinstance(rounds, dict):
        raise ConfigError(f"--config {path}: [rounds] must be a table")
    return rounds


def _document(path: Path) -> dict[str, Any]:
    """A run file's TOML, its tables known."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"--config {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"--config {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8, as TOML requires"
        ) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"run", "task", "rounds"})
    if unknown:
        raise ConfigError(
            f"--config {path}: unknown table(s) {unknown}; a run file has [run], [task] and [rounds]"
        )
    return document


def parse_with_run_file(
    parser: argparse.ArgumentParser, settings: Sequence[Setting], argv: Sequence[str] | None
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The flags, with the [run] of the run file named by --config as their defaults (so only a
    flag typed on the command line overrides the file), and that file's [task] table."""
    first, _ = parser.parse_known_args(argv)
    table: dict[str, Any] = {}
    if first.config is not None:
        run, table = read_run_file(first.config)
        parser.set_defaults(**check_run_values(run, settings, first.config))
    return parser.parse_args(argv), table


def check_run_values(
    values: Mapping[str, Any], settings: Sequence[Setting], path: Path, *, only_known: bool = True
) -> dict[str, Any]:
    """A run file's [run] values checked against their declarations, with paths resolved from
    the file's folder. Keys not declared are refused, or left out with only_known=False (a
    launcher reads the few it needs; the server checks them all)."""
    table = by_name(s for s in settings if s.in_file)
    checked: dict[str, Any] = {}
    for key, value in values.items():
        setting = table.get(key)
        if setting is None:
            if only_known:
                raise ConfigError(
                    f"--config {path}: [run] has no setting {key!r}; settings are the flags without "
                    f"dashes: {', '.join(sorted(table))}"
                )
            continue
        checked[key] = setting.check(_resolved(path.parent, setting, value), f"{path}: [run] {key}")
    return checked


@dataclass(frozen=True)
class Chosen:
    """Which settings a person chose for a launcher's run: typed as flags, or keys of the run
    file's [run]. Only these are passed on to fl-server; a default nobody chose is not, since
    it would override the run file's value or the server's own choice (a saved model as the
    task when no task is given)."""

    typed: frozenset[str]
    in_file: frozenset[str]

    def __contains__(self, name: object) -> bool:
        return name in self.typed or name in self.in_file


def merge_run_file(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    args: argparse.Namespace,
    settings: Sequence[Setting],
    config: Path | None,
) -> Chosen:
    """A launcher's values, flags typed over the run file's [run] over defaults: sets on `args`
    each of `settings` that the file gives and no flag typed (the file's other keys are the
    server's to check), and says which were chosen."""
    typed = typed_flags(parser, argv)
    run: dict[str, Any] = {}
    if config is not None:
        run, _ = read_run_file(config)
        for name, value in check_run_values(run, settings, config, only_known=False).items():
            if name not in typed:
                setattr(args, name, value)
    return Chosen(frozenset(typed), frozenset(run))


def _resolved(folder: Path, setting: Setting, value: Any) -> Any:
    if not isinstance(value, str) or Path(value).is_absolute():
        return value
    candidate = folder / value
    exists = candidate.parent.is_dir() if "{id}" in value else candidate.exists()  # a file per client
    if setting.kind is Path or (setting.maybe_path and exists):
        return str(candidate)
    return value
