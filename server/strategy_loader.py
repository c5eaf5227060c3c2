"""Finding a user's strategy (`--strategy`), and checking a resumed run still has the same one.

A strategy spec that is not a built-in name is, as for tasks (fedgrpc.common.task_loader):

- a Python file, `my_strategy.py`: imported from its path (its folder is put on sys.path so it
  can import its own helpers); it must assign a MeanStrategy or UpdatesStrategy to `strategy`;
- `package.module:attribute`: an importable module and the strategy in it;
- the name of an installed strategy: an entry point in the `fedgrpc.strategies` group.

Its identity is its name and the SHA-256 of the source file that defines it (`Origin`), recorded
in the checkpoint: a server resuming a run refuses a strategy whose file changed since, since
the rounds to come would not be aggregated as the past ones were. Every failure is a
ConfigError that says what to do, raised before any round starts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from ..common.errors import ConfigError
from ..common.source_files import import_file, import_named
from .strategies import ENTRY_POINT_GROUP, MeanStrategy, Origin, UpdatesStrategy

ATTRIBUTE = "strategy"  # what a strategy file assigns


def load_strategy(spec: str) -> MeanStrategy | UpdatesStrategy:
    """The user's strategy `spec` names (see the module docstring), its origin set."""
    if spec.endswith(".py") or Path(spec).is_file():
        return _from_file(Path(spec), spec)
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        return _from_module(spec, module_name, attribute)
    module_name, _, attribute = _entry_point(spec).value.partition(":")
    return _from_module(spec, module_name, attribute or ATTRIBUTE)


def check_spec(spec: str) -> None:
    """Refuse, as the flags are read, a name that is neither a file, module:attribute nor an
    installed strategy (nothing is imported yet)."""
    if not (spec.endswith(".py") or Path(spec).is_file() or ":" in spec):
        _entry_point(spec)


def _entry_point(spec: str) -> EntryPoint:
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == spec]
    if not found:
        from .strategy import STRATEGIES

        installed = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise ConfigError(
            f"no strategy named {spec!r}: choose from {', '.join(STRATEGIES)}, or give your own as a "
            f"file (my_strategy.py), module:attribute or the name of an installed strategy "
            f"({', '.join(installed) or 'none installed'}; see docs/strategies.md)"
        )
    return found[0]


def _from_file(path: Path, spec: str) -> MeanStrategy | UpdatesStrategy:
    module, path = import_file(path, "strategy", ConfigError)
    return _strategy_in(module, ATTRIBUTE, spec, path)


def _from_module(spec: str, module_name: str, attribute: str) -> MeanStrategy | UpdatesStrategy:
    module = import_named(spec, module_name, "strategy", ConfigError)
    file = getattr(module, "__file__", None)
    if file is None:
        raise ConfigError(f"strategy module {module_name!r} has no source file to identify it by")
    return _strategy_in(module, attribute, spec, Path(file))


def _strategy_in(
    module: ModuleType, attribute: str, source: str, file: Path
) -> MeanStrategy | UpdatesStrategy:
    strategy = getattr(module, attribute, None)
    if isinstance(strategy, type) and issubclass(strategy, MeanStrategy | UpdatesStrategy):
        raise ConfigError(
            f"{source}: `{attribute}` is the class {strategy.__name__}; assign an instance "
            f"(`{attribute} = {strategy.__name__}()`)"
        )
    if not isinstance(strategy, MeanStrategy | UpdatesStrategy):
        found = type(strategy).__name__ if strategy is not None else "nothing"
        raise ConfigError(
            f"{source} defines no strategy: `{attribute}` is {found}; assign an instance of a "
            f"subclass of fedgrpc.server.strategies.MeanStrategy or UpdatesStrategy to `{attribute}`"
        )
    if not isinstance(strategy.name, str) or not strategy.name:
        strategy.name = type(strategy).__name__.lower()
    strategy.origin = Origin(source, hashlib.sha256(file.read_bytes()).hexdigest())
    return strategy


def check_resumable(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> None:
    """Refuse to resume a run with another user strategy than the one it began with, or one
    whose file changed since (`saved`: the checkpoint's strategy record, None in older ones)."""
    if saved is None or ("digest" not in saved and "digest" not in current):
        return  # built-in strategies: as before, the checkpoint's state says what it needs
    advice = "or start a new run with another --out"
    if saved.get("name") != current.get("name"):
        raise ConfigError(
            f"the checkpoint in --out is of a run aggregated by strategy {saved.get('name')!r}, not "
            f"{current.get('name')!r}: resume with the --strategy it began with, {advice}"
        )
    if saved.get("digest") != current.get("digest"):
        was, now = str(saved.get("digest"))[:12], str(current.get("digest"))[:12]
        raise ConfigError(
            f"strategy {current.get('name')!r} ({current.get('source')}) has changed since this run began "
            f"(its file's SHA-256 was {was}, now {now}): "
            f"the rounds to come would not be aggregated as the past ones were. Put the file back as it "
            f"was (from {saved.get('source')}) to resume, {advice}"
        )
