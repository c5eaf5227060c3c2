"""Who may talk to the coordinator: TLS credentials and per-client identities.

A client proves who it is with a bearer token (call metadata `authorization: Bearer <token>`)
or, under mutual TLS, with its certificate, whose common name must be exactly `client-<id>`
(ASCII digits, no leading zero, an id of the run). The tokens file stores SHA-256 digests,
never tokens:

    {"clients": {"1": "<sha256 hex of client 1's token>", "2": "..."}}

(`fl-server --hash-token TOKEN` prints a digest.) A token is checked by one lookup of its
digest in a table loaded once (TokenTable: digest bytes -> client id; 135 bytes an identity
measured by bench/scale.py --enrolled, so a million enrolled clients cost ~135 MB, and no call
reads the file or scans the table). The lookup's timing can only tell an attacker about the
SHA-256 of a token it already holds, never about another's. A tokens file is looked at (stat)
at most once a second and re-read when it changed, as fedgrpc.server.revocation does; a file
that became unreadable keeps the last good table. An identity is established from the call's
metadata when the call starts, before any message is read (`identify`), and is bound to its
client id: client 2 can neither fetch as nor submit for client 3 (`require`).
fedgrpc.server.admission does both for every call, and logs refusals through
fedgrpc.server.refusals, so no client can flood the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ..common.errors import AuthError, ConfigError
from ..common.protocol import AUTHORIZATION_KEY, BEARER_PREFIX
from .revocation import RevocationList
from .watched_file import CHECK_EVERY_S, WatchedFile

log = logging.getLogger(__name__)
_HEX = "0123456789abcdef"

CERT_NAME_PREFIX = "client-"
_CERT_NAME = re.compile(r"client-([1-9][0-9]{0,9})")

#: The context of a call on the coordinator's grpc.aio server.
CallContext = grpc.aio.ServicerContext[Any, Any]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(text: str) -> dict[int, str]:
    """Client id -> token digest (lower-case hex) of a tokens file's text; ValueError when it is
    not the documented shape or an entry is not a SHA-256 hex digest."""
    try:
        entries = json.loads(text)["clients"]
        tokens = {int(client): str(digest).lower() for client, digest in entries.items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f'not {{"clients": {{"<id>": "<sha256 hex>"}}}}: {exc!r}') from None
    bad = [c for c, d in tokens.items() if len(d) != 64 or d.strip(_HEX)]
    if bad:
        raise ValueError(f"entries for clients {bad[:10]} are not SHA-256 hex digests")
    return tokens


def token_index(tokens: Mapping[int, str]) -> dict[bytes, int]:
    """Digest (32 bytes) -> client id; a digest two clients share goes to the lower id."""
    index: dict[bytes, int] = {}
    for client in sorted(tokens):
        index.setdefault(bytes.fromhex(tokens[client]), client)
    return index


class TokenTable:
    """The token digests of one tokens file, as a lookup table kept current by looking at the
    file at most once a second (see the module docstring)."""

    def __init__(
        self, path: Path, *, check_every_s: float = CHECK_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self._file = WatchedFile(
            path,
            lambda text: token_index(parse_tokens(text)),
            label="tokens file",
            describe=lambda index: f"{len(index)} clients",
            check_every_s=check_every_s,
            clock=clock,
        )

    @property
    def reads(self) -> int:
        """Times the file was read (a test sees that a call reads none)."""
        return self._file.reads

    def __len__(self) -> int:
        return len(self._file.value)

    def __repr__(self) -> str:
        return f"TokenTable({str(self.path)!r}, {len(self)} clients)"

    def client_of(self, digest: bytes) -> int | None:
        """The client id whose token has this SHA-256 digest, None if none."""
        return self._file.value.get(digest)


def load_tokens(path: Path) -> TokenTable:
    """The tokens file's table, re-read when the file changes (see the module docstring)."""
    return TokenTable(path)


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mutual TLS, every client must present a certificate it signed

    def credentials(self) -> grpc.ServerCredentials:
        try:
            pair = (self.key.read_bytes(), self.cert.read_bytes())
            ca = self.client_ca.read_bytes() if self.client_ca else None
        except OSError as exc:
            raise ConfigError(f"cannot read TLS files: {exc}") from None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


@dataclass(frozen=True)
class _FixedTokens:
    """Digests given as a mapping (tests, embedding): indexed once, never re-read."""

    client_of: Callable[[bytes], int | None]


class Authenticator:
    """Maps a call to the client id it proved, and refuses calls that claim another one."""

    def __init__(
        self,
        tokens: TokenTable | Mapping[int, str] | None = None,
        *,
        mutual_tls: bool = False,
        revoked: RevocationList | None = None,
    ) -> None:
        """`tokens`: a tokens file's table, or client id -> digest (indexed here, once)."""
        self._tokens: TokenTable | _FixedTokens | None = (
            _FixedTokens(token_index(tokens).get)
            if tokens is not None and not isinstance(tokens, TokenTable)
            else tokens
        )
        self._mutual_tls = mutual_tls
        self._revoked = revoked

    @property
    def enabled(self) -> bool:
        return self._tokens is not None or self._mutual_tls

    def identify(self, context: CallContext) -> int | None:
        """The client id this call proved from its metadata or certificate (None with no
        authentication configured); raises AuthError, also for a revoked id. Reads no message."""
        client = self._identify(context)
        if client is not None and self._revoked is not None and self._revoked.is_revoked(client):
            raise AuthError(f"client {client}'s identity was revoked (fl-provision revoke)")
        return client

    def _identify(self, context: CallContext) -> int | None:
        if not self.enabled:
            return None
        if self._tokens is not None:
            token = self._bearer(context)
            if token is None:
                if self._mutual_tls and (client := self._certificate_client(context)) is not None:
                    return client
                raise AuthError("no credentials: send 'authorization: Bearer <token>' (fl-client --token)")
            client = self._tokens.client_of(hashlib.sha256(token.encode()).digest())
            if client is None:
                raise AuthError("the token is not valid for this server")
            return client
        client = self._certificate_client(context)
        if client is None:
            raise AuthError(
                f"the client certificate's common name must be {CERT_NAME_PREFIX}<id>, e.g. client-3"
            )
        return client

    @staticmethod
    def require(proven: int | None, claimed: int) -> None:
        """Refuse a call whose identity (from `identify`) is not the client id it claims."""
        if proven is not None and proven != claimed:
            raise AuthError(
                f"authenticated as client {proven}, which may not act as client {claimed}",
                code="PERMISSION_DENIED",
            )

    @staticmethod
    def _bearer(context: CallContext) -> str | None:
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION_KEY and isinstance(value, str) and value.startswith(BEARER_PREFIX):
                return value[len(BEARER_PREFIX) :]
        return None

    @staticmethod
    def _certificate_client(context: CallContext) -> int | None:
        names: Any = context.auth_context().get("x509_common_name", [])
        for raw in names:
            match = _CERT_NAME.fullmatch(raw.decode("ascii", errors="replace"))
            if match:
                return int(match.group(1))
        return None
