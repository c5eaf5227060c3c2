"""The sites a standing federation has heard from: fedgrpc.v1.Sites (Announce) and what it keeps.

The only module of fedgrpc.server that touches sites_pb2. A site agent announces its version,
its installed tasks and a summary of its policy, at start and whenever it reaches the
coordinator again; the dashboard's federation view shows them. Admission is the Coordinator
service's own (a fedgrpc.server.admission interceptor with the sites' Authenticator): a call
without a site identity is refused UNAUTHENTICATED, and the announcement is filed under the
id the call proved. What a site says is only shown, never trusted: it admits nothing and
decides nothing. Every string and list is bounded (`check`): past a bound, INVALID_ARGUMENT.

    unknown --Announce--> announced (last_seen now) --no word for ONLINE_S--> offline (kept)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from fedgrpc.v1 import sites_pb2 as pb

from ..common.errors import AuthError
from .admission import Admission
from .auth import Authenticator, CallContext
from .limits import Limits
from .refusals import RefusalLog

SERVICE = pb.DESCRIPTOR.services_by_name["Sites"].full_name
MAX_TEXT = 64
MAX_POLICY_VALUE = 200
MAX_ENTRIES = 32
MAX_SITES = 1000
#: How often an agent announces again while it waits (the reply tells it), and how long after
#: its last word a site still counts as online.
ANNOUNCE_EVERY_S = 30.0
ONLINE_S = 3 * ANNOUNCE_EVERY_S


class AnnouncementError(ValueError):
    """An announcement past a bound: the call's INVALID_ARGUMENT."""


@dataclass(frozen=True)
class SiteRecord:
    client_id: int
    address: str
    version: str
    tasks: tuple[tuple[str, str], ...]  # (name, digest)
    policy: tuple[tuple[str, str], ...]
    first_seen: float
    last_seen: float

    def view(self, now: float, seen_in_job: Callable[[int], bool]) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "address": self.address,
            "version": self.version,
            "tasks": [{"name": name, "digest": digest} for name, digest in self.tasks],
            "policy": dict(self.policy),
            "online": now - self.last_seen <= ONLINE_S or seen_in_job(self.client_id),
            "last_seen_s": round(now - self.last_seen, 1),
        }


def _text(value: str, what: str, limit: int = MAX_TEXT) -> str:
    if len(value) > limit or not value.isprintable():
        raise AnnouncementError(f"{what}: at most {limit} printable characters")
    return value


Pairs = tuple[tuple[str, str], ...]


def check(request: pb.SiteAnnouncement) -> tuple[str, Pairs, Pairs]:
    """The announcement's version, tasks and policy, every bound checked."""
    if len(request.tasks) > MAX_ENTRIES or len(request.policy) > MAX_ENTRIES:
        raise AnnouncementError(f"at most {MAX_ENTRIES} tasks and {MAX_ENTRIES} policy entries")
    tasks = tuple((_text(t.name, "a task's name"), _text(t.digest, "a task's digest")) for t in request.tasks)
    policy = tuple(
        sorted(
            (_text(key, "a policy key"), _text(value, "a policy value", MAX_POLICY_VALUE))
            for key, value in request.policy.items()
        )
    )
    return _text(request.version, "version"), tasks, policy


class SiteRegistry:
    """The sites heard from, by client id (at most MAX_SITES: the longest silent goes first)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._sites: dict[int, SiteRecord] = {}
        self.version = 0  # bumped on every announcement

    def announce(self, client_id: int, address: str, request: pb.SiteAnnouncement) -> None:
        version, tasks, policy = check(request)
        with self._lock:
            now = self._clock()
            old = self._sites.get(client_id)
            if old is None and len(self._sites) >= MAX_SITES:
                del self._sites[min(self._sites.values(), key=lambda s: s.last_seen).client_id]
            first = old.first_seen if old is not None else now
            self._sites[client_id] = SiteRecord(client_id, address, version, tasks, policy, first, now)
            self.version += 1

    def view(self, seen_in_job: Callable[[int], bool] = lambda _: False) -> list[dict[str, Any]]:
        with self._lock:
            now = self._clock()
            return [s.view(now, seen_in_job) for s in sorted(self._sites.values(), key=lambda s: s.client_id)]


class SitesServicer:
    """fedgrpc.v1.Sites; serve `handler()` with `admission` among the interceptors."""

    def __init__(self, registry: SiteRegistry, auth: Authenticator, limits: Limits, max_clients: int) -> None:
        self.registry = registry
        self._auth = auth
        self.refusals = RefusalLog()
        self.admission = Admission(
            SERVICE, {}, authenticator=auth, limits=limits, num_clients=max_clients,
            refusals=self.refusals, ended_early=lambda: None,
        )  # fmt: skip

    def handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        announce = grpc.unary_unary_rpc_method_handler(
            self.Announce,
            request_deserializer=pb.SiteAnnouncement.FromString,
            response_serializer=lambda reply: reply.SerializeToString(),
        )
        return grpc.method_handlers_generic_handler(SERVICE, {"Announce": announce})

    async def Announce(self, request: pb.SiteAnnouncement, context: CallContext) -> pb.AnnounceReply:
        proven = self._auth.identify(context)
        client_id = proven if proven is not None else request.client_id
        if client_id is None or client_id < 0:
            raise AuthError("a site announces under its own client id")
        try:
            self.registry.announce(client_id, _peer(context), request)
        except AnnouncementError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.AnnounceReply(announce_every_s=ANNOUNCE_EVERY_S)


def _peer(context: CallContext) -> str:
    peer = str(context.peer())
    return peer if peer.isprintable() and len(peer) <= 200 else ascii(peer)[:200]
