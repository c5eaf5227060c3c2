"""A site's own state for a run, kept on its disk across rounds and restarts of the site.

Some strategies need clients that remember (SCAFFOLD's control variate c_i), and so may a
task (a personal layer, a local optimizer's moments): `StateStore` keeps named groups of
named arrays for one run, each group one .npz file under the site's state directory:

    <state dir>/<run_id>/<group>.npz

Nothing here is ever sent: what leaves the site is what the strategy's protocol sends (its
extra tensors), nothing more. A group is written atomically (a temporary file in the same
folder, fsync'd, then renamed over the old one), so a site killed mid-write finds the last
complete version on restart, and read with allow_pickle=False: a state file can hold arrays
only, never code. The directory is created on the first write, so a run that keeps nothing
leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import ConfigError

#: fl-client's --state-dir by default: kept out of the working directory, one folder per client id.
DEFAULT_STATE_DIR = "~/.local/state/fedgrpc/client-{id}"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


class StateStore:
    """One site's state for one run (see the module's docstring)."""

    def __init__(self, root: Path, run_id: str) -> None:
        _check_name(run_id, "run id")
        self.folder = Path(root) / run_id

    def __repr__(self) -> str:
        return f"StateStore({str(self.folder)!r}, groups={self.groups()})"

    def groups(self) -> list[str]:
        """The groups saved so far."""
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.npz"))

    def load(self, group: str) -> dict[str, np.ndarray] | None:
        """The arrays last saved under `group`, or None if it was never saved."""
        path = self._path(group)
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        except FileNotFoundError:
            return None

    def save(self, group: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Replace `group` with `arrays`, atomically: a reader sees the old version or this one."""
        path = self._path(group)
        named: dict[str, Any] = {name: np.asarray(a) for name, a in arrays.items()}
        for name, array in named.items():
            if array.dtype.hasobject:  # numpy would pickle it
                raise TypeError(
                    f"state {group!r}: {name!r} holds Python objects; a state holds arrays of numbers"
                )
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{group}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, **named)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _path(self, group: str) -> Path:
        _check_name(group, "state group")
        return self.folder / f"{group}.npz"


def _check_name(name: str, what: str) -> None:
    if not _NAME.fullmatch(name) or name.startswith("."):
        raise ConfigError(f"{what} {name!r} cannot name a file: use letters, digits, _ . - only")


def site_state_dir(state_dir: str, client_id: int) -> Path:
    """A client's state directory: `{id}` in the operator's --state-dir becomes its id."""
    return Path(state_dir.replace("{id}", str(client_id))).expanduser()
