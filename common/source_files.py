"""Importing the user's own Python: a task or a strategy given as a file or as module:attribute.

Both are loaded the same way (fedgrpc.common.task_loader, fedgrpc.server.strategy_loader): a
file is imported under a name derived from its resolved path, with its folder on sys.path so
that it can import its own helper modules; a failure is one line naming the file's line where
it happened, never a traceback. `what` ("task", "strategy") starts each message, and `error`
is the caller's exception class.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType


def import_file(path: Path, what: str, error: Callable[[str], Exception]) -> tuple[ModuleType, Path]:
    """The module defined by the file at `path`, and the file's resolved path."""
    if not path.is_file():
        raise error(f"{what} file {path} does not exist")
    path = path.resolve()
    name = f"fedgrpc_{what}_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise error(f"{what} file {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # so the file can import its own helper modules
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        raise error(f"{what} file {path} could not be imported: {describe(exc, path)}") from exc
    return module, path


def import_named(spec: str, module_name: str, what: str, error: Callable[[str], Exception]) -> ModuleType:
    """The installed module `module_name` (from `spec`, as the user wrote it)."""
    try:
        return importlib.import_module(module_name)
    except BaseException as exc:
        raise error(f"{what} module {module_name!r} ({spec}) could not be imported: {describe(exc)}") from exc


def describe(exc: BaseException, path: Path | None = None) -> str:
    """The exception in one line, with the line of the file where it happened."""
    what = traceback.format_exception_only(type(exc), exc)[-1].strip()
    if isinstance(exc, SyntaxError) and exc.lineno:
        what += f" (line {exc.lineno})"
    elif path is not None:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
        if frames:
            what += f" (line {frames[-1].lineno})"
    return what
