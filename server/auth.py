"""Who may talk to the coordinator: TLS credentials and per-client identities.

A client proves who it is with a bearer token (call metadata `authorization: Bearer <token>`)
or, under mutual TLS, with its certificate, whose common name must be exactly `client-<id>`
(ASCII digits, no leading zero, an id of the run). The tokens file stores SHA-256 digests,
never tokens:

    {"clients": {"1": "<sha256 hex of client 1's token>", "2": "..."}}

(`fl-server --hash-token TOKEN` prints a digest.) Digests are compared in constant time. An
identity is established from the call's metadata when the call starts, before any message is
read (`identify`), and is bound to its client id: client 2 can neither fetch as nor submit for
client 3 (`require`). fedgrpc.server.admission does both for every call, and logs refusals
through fedgrpc.server.refusals, so no client can flood the log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ..common.errors import AuthError, ConfigError
from ..common.protocol import AUTHORIZATION_KEY, BEARER_PREFIX
from .revocation import RevocationList

CERT_NAME_PREFIX = "client-"
_CERT_NAME = re.compile(r"client-([1-9][0-9]{0,9})")

#: The context of a call on the coordinator's grpc.aio server.
CallContext = grpc.aio.ServicerContext[Any, Any]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: Path) -> dict[int, str]:
    """Client id -> token digest, from a tokens file (see the module docstring)."""
    try:
        document = json.loads(path.read_text())
        entries = document["clients"]
        tokens = {int(client): str(digest).lower() for client, digest in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f'tokens file {path} is not {{"clients": {{"<id>": "<sha256 hex>"}}}}: {exc}'
        ) from None
    bad = [c for c, d in tokens.items() if len(d) != 64 or any(ch not in "0123456789abcdef" for ch in d)]
    if bad:
        raise ConfigError(f"tokens file {path}: entries for clients {bad} are not SHA-256 hex digests")
    return tokens


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


class Authenticator:
    """Maps a call to the client id it proved, and refuses calls that claim another one."""

    def __init__(
        self,
        tokens: dict[int, str] | None = None,
        *,
        mutual_tls: bool = False,
        revoked: RevocationList | None = None,
    ) -> None:
        self._tokens = tokens
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
            digest = hash_token(token)
            matches = [c for c, known in self._tokens.items() if hmac.compare_digest(digest, known)]
            if not matches:
                raise AuthError("the token is not valid for this server")
            return matches[0]
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
