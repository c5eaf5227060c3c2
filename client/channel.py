"""How a client reaches the coordinator: its channel's security and settings, and when a failed
call is tried again. Shared by the blocking Connection and the grpc.aio AioConnection; nothing
here touches generated *_pb2 types.

The status codes a call fails with become fedgrpc errors here (Retries.failed):

    UNAVAILABLE, DEADLINE_EXCEEDED,  retried with exponential backoff and jitter until the
    CANCELLED, RESOURCE_EXHAUSTED    connect timeout, then ServerUnavailableError (the server
                                     is down, restarting, or at one of its limits)
    UNAUTHENTICATED                  AuthError (missing or wrong credentials)
    PERMISSION_DENIED                AuthError (credentials of another client)
    NOT_FOUND                        NotEnrolledError
    FAILED_PRECONDITION              StaleRoundError (the connection makes it TaskMismatchError
                                     when it answers Join)
    anything else                    UpdateRejectedError with the server's message
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from ..common.errors import (
    AuthError,
    ConfigError,
    FedGrpcError,
    NotEnrolledError,
    ServerUnavailableError,
    StaleRoundError,
    UpdateRejectedError,
)
from ..common.protocol import AUTHORIZATION_KEY, BEARER_PREFIX

log = logging.getLogger("fedgrpc.client.connection")

# CANCELLED too: this client never cancels its own calls, so a cancel comes from a server stopping.
# RESOURCE_EXHAUSTED: the server is at a limit on open calls (its messages are far below the
# size limit), which frees up as other calls end.
_RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


def wake_waiting_calls_every(seconds: float) -> None:
    """For a process whose many threads each wait on a call (simulated clients, load tests).

    gRPC's blocking API wakes every waiting thread ten times a second, so that a signal reaches
    the main thread soon; with thousands of threads those wake-ups alone keep the cores busy in
    the kernel and starve the calls themselves. This lengthens the interval for the process
    (Ctrl-C then takes up to `seconds` to act on a thread blocked in a call)."""
    from grpc import _common

    if not isinstance(getattr(_common, "MAXIMUM_WAIT_TIMEOUT", None), float):
        log.warning("this grpcio has no MAXIMUM_WAIT_TIMEOUT: waiting threads wake at its own pace")
        return
    _common.MAXIMUM_WAIT_TIMEOUT = seconds


#: Channel settings: keepalive pings so a dead server is noticed during a long poll, and
#: message limits well above one chunk (streams never need more).
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 << 20),
]


@dataclass(frozen=True)
class ChannelSecurity:
    """How this client proves the server is real (TLS, `ca`) and who it is itself (`token`, or a
    certificate `cert`/`key` under mutual TLS). No `ca` means plain text: only with --insecure."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token: str | None = None
    server_name: str | None = None  # the name in the server's certificate, when not the host dialled

    def channel(self, target: str) -> grpc.Channel:
        if self.ca is None:
            return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        credentials, options = self._tls()
        return grpc.secure_channel(target, credentials, options=options)

    def aio_channel(self, target: str) -> grpc.aio.Channel:
        """The same channel for grpc.aio (call from the event loop that will use it)."""
        if self.ca is None:
            return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        credentials, options = self._tls()
        return grpc.aio.secure_channel(target, credentials, options=options)

    def _tls(self) -> tuple[grpc.ChannelCredentials, list[tuple[str, int | str]]]:
        assert self.ca is not None
        try:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.ca.read_bytes(),
                private_key=self.key.read_bytes() if self.key else None,
                certificate_chain=self.cert.read_bytes() if self.cert else None,
            )
        except OSError as exc:
            raise ConfigError(f"cannot read TLS files: {exc}") from None
        options = list(CHANNEL_OPTIONS)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return credentials, options

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION_KEY, f"{BEARER_PREFIX}{self.token}"),) if self.token else ()


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, bounded by a total time budget."""

    initial_s: float = 0.25
    maximum_s: float = 5.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        delay = self.initial_s
        while True:
            yield random.uniform(0, delay)
            delay = min(self.maximum_s, delay * self.multiplier)


def error_from(exc: grpc.RpcError) -> FedGrpcError:
    """The fedgrpc error for a call's failure status (the table in this module's docstring)."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthError(details)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return AuthError(details, code="PERMISSION_DENIED")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotEnrolledError(details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return StaleRoundError(details)
    return UpdateRejectedError(details or code.name, code=code.name)


@dataclass
class Tries:
    """One call's tries so far (see Retries)."""

    deadline: float
    delays: Iterator[float]
    failures: int = 0


class Retries:
    """When a failed call is tried again, and what the log says about it, for one connection.

    Retryable codes are tried again with `backoff` until `connect_timeout_s` has passed, then
    ServerUnavailableError; other codes become fedgrpc errors at once. The first answer after
    failures logs that the server "answered", later ones that it "is back"."""

    def __init__(self, target: str, connect_timeout_s: float, backoff: Backoff) -> None:
        self.target, self.connect_timeout_s, self.backoff = target, connect_timeout_s, backoff
        self.answered = False  # whether the server has answered this connection once
        self.retried: dict[str, int] = {}  # calls retried, by the status code that failed them

    def begin(self) -> Tries:
        return Tries(time.monotonic() + self.connect_timeout_s, self.backoff.delays())

    def succeeded(self, what: str, tries: Tries) -> None:
        if tries.failures:
            how = "is back" if self.answered else "answered"
            log.info("%s: server at %s %s", what, self.target, how)
        self.answered = True

    def failed(self, what: str, tries: Tries, exc: grpc.RpcError) -> float:
        """The seconds to wait before the next try; raises when there is none."""
        code = exc.code()
        if code not in _RETRYABLE:
            raise error_from(exc) from None
        tries.failures += 1
        self.retried[code.name] = self.retried.get(code.name, 0) + 1
        if tries.failures == 1 and what != "join":
            log.warning(
                "%s: %s (%s); retrying for up to %.0f s",
                what,
                code.name,
                exc.details(),
                self.connect_timeout_s,
            )
        remaining = tries.deadline - time.monotonic()
        if remaining <= 0:
            raise ServerUnavailableError(
                f"could not {what} at {self.target} for {self.connect_timeout_s:.0f} s "
                f"({code.name}: {exc.details()}); is fl-server running there?"
            ) from None
        delay = min(next(tries.delays), remaining)
        log.debug("%s: %s, retrying in %.2f s", what, code.name, delay)
        return delay
