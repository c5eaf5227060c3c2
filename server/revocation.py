"""Revoked client identities: a file the coordinator re-reads when it changes (`fl-server --revoked`).

    {"revoked": [{"client": 2, "common_name": "client-2", "serial": "5f3a...", "revoked_at": "..."}]}

`fl-provision revoke` writes it (fedgrpc.server.provision). Lookup is by client id: the
identity the server establishes for a call (fedgrpc.server.auth) *is* a client id, proved by
a certificate named `client-<id>` or by a token, so refusing the id refuses the site whatever
credential it presents, and costs a set lookup. A site whose identity was revoked comes back
under a new id, never under its old one. The serial and common name are recorded for people
reading the file (and a future X.509 CRL); they are not consulted.

    loaded --(a call, >= 1 s since the last look, file's (inode, mtime, size) changed)--> loaded again
       \\--(the changed file cannot be read or parsed)--> keeps the last good list, warns once a change

Every call made by the servicer's event loop asks `is_revoked`; the file is stat'ed at most once
a second, so a revocation takes effect within a second, with no restart. A file that cannot be
read at start is a ConfigError; later, a half-written or missing file keeps the last good list
(fl-provision replaces the file atomically, so this only happens when someone edits it by hand).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..common.errors import ConfigError

log = logging.getLogger(__name__)

#: Seconds between two looks at the file's metadata.
CHECK_EVERY_S = 1.0


def parse(text: str) -> frozenset[int]:
    """The client ids a revocation file lists; ValueError when it is not the documented shape."""
    document = json.loads(text)
    entries = document["revoked"] if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError('not {"revoked": [{"client": <id>, ...}, ...]}')
    ids = set()
    for entry in entries:
        client = entry.get("client") if isinstance(entry, dict) else None
        if type(client) is not int or client < 1:
            raise ValueError(f"entry {entry!r} has no positive integer 'client'")
        ids.add(client)
    return frozenset(ids)


def dump(entries: Iterable[Mapping[str, Any]]) -> str:
    """A revocation file's text for `entries` (each with at least "client"), sorted by client id."""
    ordered = sorted(entries, key=lambda entry: int(entry["client"]))
    return json.dumps({"revoked": ordered}, indent=2) + "\n"


class RevocationList:
    """The revoked client ids of one file, kept current by looking at the file at most once a second."""

    def __init__(
        self, path: Path, *, check_every_s: float = CHECK_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self._check_every_s = check_every_s
        self._clock = clock
        self._signature: tuple[int, int, int] | None
        try:
            self._signature = self._stat()
            self._revoked = parse(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--revoked {path}: {exc}") from None
        self._checked_at = clock()
        log.info("revocation list %s: %d revoked client ids", path, len(self._revoked))

    def __repr__(self) -> str:
        return f"RevocationList({str(self.path)!r}, revoked={sorted(self._revoked)})"

    def is_revoked(self, client: int) -> bool:
        now = self._clock()
        if now - self._checked_at >= self._check_every_s:
            self._checked_at = now
            self._refresh()
        return client in self._revoked

    def _stat(self) -> tuple[int, int, int]:
        info = os.stat(self.path)
        return info.st_ino, info.st_mtime_ns, info.st_size

    def _refresh(self) -> None:
        try:
            signature = self._stat()
            if signature == self._signature:
                return
            revoked = parse(self.path.read_text())
        except (OSError, ValueError) as exc:
            if self._signature is not None:  # warn once per change, not once a second
                log.warning("revocation list %s unreadable, keeping the last one: %s", self.path, exc)
            self._signature = None
            return
        self._signature, self._revoked = signature, revoked
        log.info("revocation list %s changed: %d revoked client ids", self.path, len(revoked))
