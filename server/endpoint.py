"""The coordinator's network endpoint: a grpc.aio server on an event loop thread of its own.

    start() --> serving --set_serving(True/False)--> ... --stop(grace)--> stopped
    serving: serve(coordinator) --> a job's Coordinator service --serve(None)--> no job --> ...

A one-run server serves its RoundCoordinator from start to stop. A standing federation
(fl-server --federation) keeps the endpoint up across its jobs and swaps the coordinator
served (`serve`): each job gets a CoordinatorServicer of its own (its admission, limits and
refusal counts); between jobs every Coordinator call is answered UNAVAILABLE ("no job is
running"), so that clients ask again later. Services beside it (the federation's admin
service) are given at construction with their own admission interceptor.

The server's driver (rounds, evaluation, checkpoints) stays on the calling thread and talks
to the handlers only through the RoundCoordinator, whose phase changes wake the loop's
long-polls (`call_soon_threadsafe`). Tensors big enough to matter are decoded and prepared
on a small worker pool, so the loop keeps serving while they are. The standard
grpc.health.v1 service reports SERVING only while `set_serving(True)`, and gRPC server
reflection lists and describes the services (`grpcurl -plaintext HOST:PORT list`) without
the proto file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import resource
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
from fedgrpc.v1 import coordinator_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Gauge

from ..common import wire
from ..common.codec import DEFAULT_CHUNK_BYTES
from ..common.errors import AuthError, ConfigError
from . import descriptors, memory
from .auth import Authenticator, ServerTls
from .intake import InflightBudget
from .limits import Limits
from .monitor import Monitor
from .rounds import RoundCoordinator
from .servicer import DEFAULT_INFLIGHT_BYTES, MAX_MESSAGE_BYTES, CoordinatorServicer

log = logging.getLogger(__name__)
T = TypeVar("T")

HEALTH_SERVICES = ("", "fedgrpc.v1.Coordinator")
_START_TIMEOUT_S = 30.0
#: Look every few seconds whether a burst of calls has ended since the last look (at least 100
#: fewer open, and at most a tenth of the peak still open); if so, give the heap's freed memory
#: back (see fedgrpc.server.memory.trim). Not while thousands of calls come and go: a trim
#: holds malloc's lock and stalls the event loop (5,000 clients: round 2 stalled in 3 of 4 runs
#: with a trim whenever 100 calls had ended, 1 of 1 finished without).
_TRIM_EVERY_S = 2.0
_TRIM_AFTER_CALLS = 100
_TRIM_BELOW_PEAK = 10


def server_options(limits: Limits, num_clients: int = 0) -> list[tuple[str, int]]:
    """Accept the clients' keepalive pings (every 20 s, also between calls) instead of answering
    them with GOAWAY, bound what one message may make the server allocate, close connections
    that hold no call for long or never finish their handshake, and close at once those past
    the descriptors left after fedgrpc.server.descriptors' reserve.

    gRPC's server queues the calls that arrive before the event loop has asked for them, and
    past 1,000 queued (3,000 for sure) it cancels new ones at random before any handler sees
    them: 10,000 clients asking at once (a round's start, the end of a long-poll) lost most of
    their calls to CANCELLED, and the clients' retries kept the queue full (bench/scale.py
    --clients 10000 --shared-channel stalled; 92,000 of 141,000 polls in 40 s cancelled, none
    with the queue as long as the server's limit on open calls)."""
    pending = limits.total(num_clients)
    return [
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", pending),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 1 << 20),
        ("grpc.max_connection_idle_ms", 300_000),
        ("grpc.server_handshake_timeout_ms", int(limits.stall_timeout_s * 1000)),
        ("grpc.max_allowed_incoming_connections", descriptors.grpc_connection_quota()),
    ]


@dataclass(frozen=True)
class EndpointConfig:
    host: str = "[::]"
    port: int = 50051
    tls: ServerTls | None = None
    authenticator: Authenticator = field(default_factory=Authenticator)
    limits: Limits = field(default_factory=Limits)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_inflight_bytes: int = DEFAULT_INFLIGHT_BYTES
    spool_dir: Path | None = None
    intake_threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    # A second port, plain text, with the health service only: for probes that cannot speak TLS
    # (Kubernetes' gRPC probes) when the main port does.
    health_port: int | None = None
    # The clients the server's overall call limit is sized for when it starts with no run
    # (a standing federation); a one-run server sizes it for its run's clients.
    max_clients: int = 0


#: Another service served beside the coordinator's: its handler, its admission interceptor,
#: and its full name (for reflection).
ExtraService = tuple["grpc.GenericRpcHandler[Any]", grpc.aio.ServerInterceptor, str]  # type: ignore[type-arg]
_COORDINATOR_PREFIX = f"/{wire.SERVICE}/"
NO_JOB = "no job is running on this coordinator; ask again later"


class GrpcEndpoint:
    """Serves one RoundCoordinator over gRPC until stopped, or one after another (`serve`)."""

    def __init__(
        self,
        coordinator: RoundCoordinator | None,
        config: EndpointConfig | None = None,
        monitor: Monitor | None = None,
        *,
        services: Sequence[ExtraService] = (),
    ) -> None:
        self.config = config or EndpointConfig()
        self.port = 0
        self.inflight = InflightBudget(self.config.max_inflight_bytes)
        self._executor = ThreadPoolExecutor(self.config.intake_threads, thread_name_prefix="fedgrpc-intake")
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_error)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop.run_forever, name="fedgrpc-grpc", daemon=True)
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port = 0
        self._housekeeping: asyncio.Task[None] | None = None
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._services = tuple(services)
        self._slot = _CoordinatorSlot(self.config.authenticator)
        self._max_clients = (
            coordinator.run.num_clients if coordinator is not None else self.config.max_clients
        )
        if coordinator is not None:
            self.serve(coordinator, monitor)

    @property
    def servicer(self) -> CoordinatorServicer:
        """The Coordinator service of the run being served."""
        servicer = self._slot.servicer
        if servicer is None:
            raise RuntimeError("no run is being served")
        return servicer

    @property
    def coordinator(self) -> RoundCoordinator:
        coordinator = self._slot.coordinator
        if coordinator is None:
            raise RuntimeError("no run is being served")
        return coordinator

    @property
    def monitor(self) -> Monitor:
        return self.servicer.monitor

    def serve(self, coordinator: RoundCoordinator | None, monitor: Monitor | None = None) -> None:
        """Serve `coordinator` from now on (a fresh servicer of its own); None: no run, every
        Coordinator call answered UNAVAILABLE until the next."""
        old = self._slot.servicer
        if coordinator is None:
            self._slot.servicer, self._slot.coordinator = None, None
            if old is not None:
                old.close_summaries()
            return
        servicer = CoordinatorServicer(
            coordinator,
            limits=self.config.limits,
            chunk_bytes=self.config.chunk_bytes,
            authenticator=self.config.authenticator,
            inflight=self.inflight,
            spool_dir=self.config.spool_dir,
            executor=self._executor,
            monitor=monitor,
        )
        self._gauges(servicer, coordinator)
        coordinator.on_phase_change(lambda: self._call_soon(servicer.phase_changed))
        if self._thread.is_alive():
            servicer.count_calls_gone()
        self._slot.servicer, self._slot.coordinator = servicer, coordinator

    def _gauges(self, servicer: CoordinatorServicer, coordinator: RoundCoordinator) -> None:
        monitor = servicer.monitor
        monitor.gauge(
            "fedgrpc_inflight_bytes",
            "Update bytes reserved for streams being received",
            lambda: self.inflight.used_bytes,
        )
        monitor.gauge(
            "fedgrpc_fold_queue_depth",
            "Accepted updates waiting to be folded in",
            lambda: coordinator.fold_queue_depth,
        )
        monitor.gauge("fedgrpc_open_calls", "gRPC calls being served", lambda: servicer.open_calls.total)
        by_kind = Gauge(
            "fedgrpc_open_calls_by_kind",
            "gRPC calls being served, by kind: long_poll, update_stream, other",
            ["kind"],
            registry=monitor.registry,
        )
        admission = servicer.admission
        for kind in admission.open_by_kind():
            by_kind.labels(kind).set_function(partial(_open_of_kind, admission.open_by_kind, kind))
        monitor.gauge(
            "fedgrpc_clients_ready", "Clients that have asked for work", lambda: coordinator.ready_clients
        )

    def start(self) -> int:
        """Bind and start serving (health NOT_SERVING until set_serving); returns the port."""
        raise_open_files_limit()
        # What exists now (TensorFlow, the task, the data) is left out of garbage collections
        # until stop(): a full collection walking it stalled the loop 0.9 s while 1,200 calls
        # were held, and held streams were cut (test_hardening's 1,200-stream test failed 2 runs
        # in 11, and about 1 in 3 with admission as an interceptor, on 2 busy cores; 0 in 11
        # with this).
        gc.freeze()
        self._thread.start()
        if self._slot.servicer is not None:
            self._slot.servicer.count_calls_gone()
        self.port = self._run(self._start())
        return self.port

    def set_serving(self, up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in HEALTH_SERVICES:
            self._run(self._health.set(service, status))

    def stop(self, grace: float = 2.0) -> None:
        """Stop taking calls, give those in progress `grace` seconds, then end the loop."""
        self._stopping = True
        if self._slot.servicer is not None:
            self._slot.servicer.close_summaries()
        if self._housekeeping is not None:
            self._loop.call_soon_threadsafe(self._housekeeping.cancel)
        if self._server is not None and self._thread.is_alive():
            self._run(self._server.stop(grace), timeout=grace + _START_TIMEOUT_S)
            self._server = None
        if self._health_server is not None and self._thread.is_alive():
            self._run(self._health_server.stop(0))
            self._health_server = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._executor.shutdown(wait=False, cancel_futures=True)
        gc.unfreeze()

    async def _start(self) -> int:
        cfg = self.config
        server = grpc.aio.server(
            options=server_options(cfg.limits, self._max_clients),
            maximum_concurrent_rpcs=cfg.limits.total(self._max_clients),
            interceptors=(self._slot, *(interceptor for _, interceptor, _ in self._services)),
        )
        server.add_generic_rpc_handlers(tuple(handler for handler, _, _ in self._services))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                wire.SERVICE,
                *(name for _, _, name in self._services),
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{cfg.host}:{cfg.port}"
        try:
            if cfg.tls is not None:
                port = server.add_secure_port(address, cfg.tls.credentials())
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise ConfigError(
                f"cannot listen on {cfg.host}:{cfg.port} (in use, or not an address of this machine)"
            )
        for service in HEALTH_SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        if cfg.health_port is not None:
            self._health_server = grpc.aio.server(
                options=[("grpc.max_allowed_incoming_connections", descriptors.HEALTH_CONNECTIONS)],
                maximum_concurrent_rpcs=64,
            )
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(f"{cfg.host}:{cfg.health_port}")
            if self.health_port == 0:
                raise ConfigError(f"cannot listen on {cfg.host}:{cfg.health_port} for --health-port")
            await self._health_server.start()
        self._housekeeping = asyncio.ensure_future(self._give_back_memory())
        return port

    async def _give_back_memory(self) -> None:
        calls = self.servicer.open_calls
        while True:
            await asyncio.sleep(_TRIM_EVERY_S)
            burst_over = calls.total * _TRIM_BELOW_PEAK <= calls.peak
            if calls.peak - calls.total >= _TRIM_AFTER_CALLS and burst_over:
                memory.trim()
            calls.reset_peak()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """gRPC's completion-queue poller may find its descriptor closed while the server stops
        (EBADF): expected then, and not worth a traceback in the server's log."""
        error = context.get("exception")
        if self._stopping and isinstance(error, OSError) and error.errno == errno.EBADF:
            return
        loop.default_exception_handler(context)

    def _run(self, coroutine: Coroutine[Any, Any, T], timeout: float = _START_TIMEOUT_S) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _call_soon(self, callback: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(callback)


def _open_of_kind(open_by_kind: Callable[[], dict[str, int]], kind: str) -> float:
    return open_by_kind()[kind]


class _CoordinatorSlot(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Routes each Coordinator call to the servicer of the run being served, through that
    servicer's own admission; with none, answers it UNAVAILABLE at once (NO_JOB), reading
    nothing, once the caller's identity holds (a revoked or unknown site hears so between jobs
    too, not "ask again later"). Other services' calls pass on."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.servicer: CoordinatorServicer | None = None
        self.coordinator: RoundCoordinator | None = None
        self._handlers: tuple[CoordinatorServicer, grpc.GenericRpcHandler] | None = None  # type: ignore[type-arg]
        self._no_job = _no_job_handlers(authenticator)

    async def intercept_service(
        self,
        continuation: Any,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        if not method.startswith(_COORDINATOR_PREFIX):
            return await continuation(handler_call_details)
        servicer = self.servicer  # one look: a swap while this call is admitted does not split it
        if servicer is None:
            return self._no_job.get(method)
        if self._handlers is None or self._handlers[0] is not servicer:
            self._handlers = (servicer, servicer.handler())
        handler = self._handlers[1]

        async def resolve(details: grpc.HandlerCallDetails) -> Any:
            return handler.service(details)

        return await servicer.admission.intercept_service(resolve, handler_call_details)


def _no_job_handlers(authenticator: Authenticator) -> dict[str, Any]:
    """One handler per Coordinator method, of the method's own kind, that answers UNAVAILABLE
    (UNAUTHENTICATED first for a caller whose identity does not hold)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            authenticator.identify(context)
        except AuthError as exc:
            await context.abort(grpc.StatusCode[exc.code], str(exc))
        await context.abort(grpc.StatusCode.UNAVAILABLE, NO_JOB)

    makers = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    service = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]
    return {
        f"{_COORDINATOR_PREFIX}{m.name}": makers[(m.client_streaming, m.server_streaming)](refuse)
        for m in service.methods
    }


def raise_open_files_limit() -> None:
    """Every connection is a file descriptor: take the hard limit, so thousands of clients fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.debug("could not raise the open files limit: %s", exc)
