"""Who may talk to the coordinator: TLS credentials and per-client identities.

A client proves who it is with a bearer token (call metadata `authorization: Bearer <token>`)
or, under mutual TLS, with its certificate, whose common name must be `client-<id>`. The
tokens file stores SHA-256 digests, never tokens:

    {"clients": {"1": "<sha256 hex of client 1's token>", "2": "..."}}

(`fl-server --hash-token TOKEN` prints a digest.) Digests are compared in constant time. An
identity is bound to its client id: client 2 can neither fetch as nor submit for client 3.
Refusals are logged once per peer host and reason, so a misconfigured client cannot flood
the log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from fedgrpc.common.errors import AuthError, ConfigError

log = logging.getLogger(__name__)

CERT_NAME_PREFIX = "client-"


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

    def __init__(self, tokens: dict[int, str] | None = None, *, mutual_tls: bool = False) -> None:
        self._tokens = tokens
        self._mutual_tls = mutual_tls
        self._logged: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._tokens is not None or self._mutual_tls

    def check(self, context: grpc.ServicerContext, claimed_client: int) -> None:
        """Raise AuthError unless the caller proved it is `claimed_client`."""
        if not self.enabled:
            return
        proven = self._identify(context)
        if proven != claimed_client:
            self._refuse(
                context,
                AuthError(
                    f"authenticated as client {proven}, which may not act as client {claimed_client}",
                    code="PERMISSION_DENIED",
                ),
            )

    def _identify(self, context: grpc.ServicerContext) -> int:
        if self._tokens is not None:
            token = self._bearer(context)
            if token is None:
                if self._mutual_tls and (client := self._certificate_client(context)) is not None:
                    return client
                self._refuse(
                    context,
                    AuthError("no credentials: send 'authorization: Bearer <token>' (fl-client --token)"),
                )
            digest = hash_token(token)
            matches = [c for c, known in self._tokens.items() if hmac.compare_digest(digest, known)]
            if not matches:
                self._refuse(context, AuthError("the token is not valid for this server"))
            return matches[0]
        client = self._certificate_client(context)
        if client is None:
            self._refuse(
                context, AuthError(f"the client certificate's common name must be {CERT_NAME_PREFIX}<id>")
            )
        return client

    @staticmethod
    def _bearer(context: grpc.ServicerContext) -> str | None:
        for key, value in context.invocation_metadata():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                return value[len("Bearer ") :]
        return None

    @staticmethod
    def _certificate_client(context: grpc.ServicerContext) -> int | None:
        names: Any = context.auth_context().get("x509_common_name", [])
        for raw in names:
            name = raw.decode(errors="replace")
            if name.startswith(CERT_NAME_PREFIX) and name[len(CERT_NAME_PREFIX) :].isdigit():
                return int(name[len(CERT_NAME_PREFIX) :])
        return None

    def _refuse(self, context: grpc.ServicerContext, error: AuthError) -> NoReturn:
        host = context.peer().rsplit(":", 1)[0]
        key = (host, str(error))
        with self._lock:
            first = key not in self._logged
            self._logged.add(key)
        if first:
            log.warning("refused %s: %s %s (logged once per peer)", host, error.code, error)
        raise error
