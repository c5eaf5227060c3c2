"""Revoked client identities: a file the coordinator re-reads when it changes (`fl-server --revoked`).

    {"revoked": [{"client": 2, "common_name": "client-2", "serial": "5f3a...", "revoked_at": "..."}]}

`fl-provision revoke` writes it (fedgrpc.server.provision). Lookup is by client id: the
identity the server establishes for a call (fedgrpc.server.auth) *is* a client id, proved by
a certificate named `client-<id>` or by a token, so refusing the id refuses the site whatever
credential it presents, and costs a set lookup. A site whose identity was revoked comes back
under a new id, never under its old one. The serial and common name are recorded for people
reading the file (and a future X.509 CRL); they are not consulted.

Every call made by the servicer's event loop asks `is_revoked`; the file is looked at as
fedgrpc.server.watched_file says (a stat at most once a second, a read only when it changed), so
a revocation takes effect within a second, with no restart; a file that later cannot be read
keeps the last good list.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .watched_file import CHECK_EVERY_S, WatchedFile

log = logging.getLogger(__name__)


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
        self._file = WatchedFile(
            path,
            parse,
            label="--revoked",
            describe=lambda revoked: f"{len(revoked)} revoked client ids",
            check_every_s=check_every_s,
            clock=clock,
        )
        log.info("revocation list %s: %d revoked client ids", path, len(self._file.value))

    def __repr__(self) -> str:
        return f"RevocationList({str(self.path)!r}, revoked={sorted(self._file.value)})"

    def is_revoked(self, client: int) -> bool:
        return client in self._file.value
