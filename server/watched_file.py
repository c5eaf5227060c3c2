"""A file the server reads once and again whenever it changes, without a restart.

    loaded --(a look, check_every_s after the last, (inode, mtime, size) changed)--> loaded again
       \\--(the changed file cannot be read or parsed)--> keeps the last good value, warns once a change

The tokens file (fedgrpc.server.auth) and the revocation list (fedgrpc.server.revocation) are
both looked at by every call the event loop admits, so a look is a clock read, and at most
once a second a stat: never a read or a parse unless the file changed. A file that cannot be
read at start is a ConfigError; later, a half-written or missing file keeps the last good
value (fl-provision and editors that save atomically replace the file whole).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from ..common.errors import ConfigError

log = logging.getLogger("fedgrpc.server")

#: Seconds between two looks at a file's metadata.
CHECK_EVERY_S = 1.0

T = TypeVar("T")


class WatchedFile(Generic[T]):
    """`parse(text)` of the file at `path`, kept current (see the module docstring).

    `label` names the file in errors and log lines ("tokens file", "--revoked"), `describe`
    says what a parsed value holds ("3 clients")."""

    def __init__(
        self,
        path: Path,
        parse: Callable[[str], T],
        *,
        label: str,
        describe: Callable[[T], str],
        check_every_s: float = CHECK_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._parse = parse
        self._label = label
        self._describe = describe
        self._check_every_s = check_every_s
        self._clock = clock
        self._signature: tuple[int, int, int] | None
        try:
            self._signature = self._stat()
            self._value = parse(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{label} {path}: {exc}") from None
        self._checked_at = clock()
        self.reads = 1  # times the file was read (a test sees that a call reads none)

    @property
    def value(self) -> T:
        """The last good contents, after a look at the file if one is due."""
        now = self._clock()
        if now - self._checked_at >= self._check_every_s:
            self._checked_at = now
            self._refresh()
        return self._value

    def _stat(self) -> tuple[int, int, int]:
        info = os.stat(self.path)
        return info.st_ino, info.st_mtime_ns, info.st_size

    def _refresh(self) -> None:
        try:
            signature = self._stat()
            if signature == self._signature:
                return
            self.reads += 1
            value = self._parse(self.path.read_text())
        except (OSError, ValueError) as exc:
            if self._signature is not None:  # warn once per change, not once a second
                log.warning("%s %s unreadable, keeping the last one: %s", self._label, self.path, exc)
            self._signature = None
            return
        self._signature, self._value = signature, value
        log.info("%s %s changed: %s", self._label, self.path, self._describe(value))
