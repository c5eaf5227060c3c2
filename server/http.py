"""The HTTP face of the coordinator (`fl-server --http PORT`): the live dashboard, its data, and
Prometheus metrics. Read-only: nothing here changes the run, and nothing is served that is not
already in history.json and the server's log (no weights, no data).

    GET /              the dashboard (fedgrpc/server/web/)
    GET /static/NAME   its script and styles, and the vendored uPlot chart library
    GET /api/state     the Monitor's snapshot, JSON (under --federation, with "federation":
                       its sites and jobs; fedgrpc.server.federation_view)
    GET /api/events    server-sent events: the snapshot whenever it changes (at most 4 a second)
    GET /metrics       Prometheus text format
    GET /healthz       "ok"

The error table of this surface:

    404  unknown path           405  a method other than GET or HEAD
    408  no complete request head within HEAD_TIMEOUT_S
    431  a request head over MAX_HEAD_BYTES
    503  more than `max_connections` connections, or `max_streams` event streams, at once, or
         too few descriptors left (fedgrpc.server.descriptors): answered and closed at once

A slow or hostile HTTP client cannot touch the gRPC service: this server has its own thread
and event loop, holds a bounded number of connections (one request each, then closed), turns
away and closes at once any past that bound or past the descriptors the checkpoints need,
gives each a few seconds to send its request head, and drops an event stream whose reader
stops reading. Small and self-contained on purpose: the asyncio HTTP servers at hand put no
time limit on a connection that never finishes its request head, and these four routes need
no more than this. It binds to 127.0.0.1 unless told otherwise.

    start() --> serving --linger(stop)?--> stop(): no new connections; event streams send the
                                           last state and end; the rest are cancelled; the
                                           loop is closed
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from . import descriptors

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 5.0
MAX_HEAD_BYTES = 8 << 10
WRITE_TIMEOUT_S = 10.0
EVENT_INTERVAL_S = 0.25
KEEPALIVE_S = 15.0

#: Every file the dashboard is made of: name -> content type. Nothing else is ever served.
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = (
    "Content-Security-Policy: default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "Referrer-Policy: no-referrer\r\n"
)
_REASONS = {
    200: "OK", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    431: "Request Header Fields Too Large", 503: "Service Unavailable",
}  # fmt: skip


class Watched(Protocol):
    """What is served: a one-run server's Monitor, or a standing federation's FederationView."""

    @property
    def version(self) -> int: ...  # moves whenever the snapshot does
    @property
    def registry(self) -> CollectorRegistry: ...
    def snapshot(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class HttpConfig:
    port: int
    host: str = "127.0.0.1"
    max_connections: int = descriptors.DASHBOARD_CONNECTIONS
    max_streams: int = 16
    linger_s: float = 0.0  # how long the dashboard stays up after the run ends (--linger, checked there)


class DashboardServer:
    """Serves one Monitor (or FederationView) over HTTP on a thread of its own until stopped."""

    def __init__(self, monitor: Watched, config: HttpConfig) -> None:
        self.monitor = monitor
        self.config = config
        self.port = 0
        self._files = {name: _web_file(name) for name in STATIC}
        self._connections = 0
        self._streams = 0
        self.turned_away = 0  # connections answered 503 and closed at once
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fedgrpc-http", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> int:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self.port

    @property
    def open_connections(self) -> int:
        """Connections being served now (not counting those turned away)."""
        return self._connections

    def linger(self, stop: threading.Event) -> None:
        """Keep serving `linger_s` seconds more (the run is over: a last look, a last scrape);
        `stop` being set ends it sooner."""
        if self.config.linger_s > 0:
            log.info("the dashboard and /metrics stay up %.0f s more (--linger)", self.config.linger_s)
            stop.wait(self.config.linger_s)

    def stop(self) -> None:
        """Stop serving; open event streams get the last state first (the page sees the run end),
        and every connection is closed before the loop is."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shutdown(self) -> None:
        self._stopping = True
        if self._server is not None:
            await _close(self._server)
        if self._tasks:  # event streams notice within EVENT_INTERVAL_S; requests end by themselves
            await asyncio.wait(set(self._tasks), timeout=4 * EVENT_INTERVAL_S)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        await asyncio.sleep(0)  # the closed transports' last callbacks

    async def _start(self) -> int:
        self._server = await asyncio.start_server(
            self._serve, self.config.host, self.config.port, limit=MAX_HEAD_BYTES
        )
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if (
            self._stopping
            or self._connections >= self.config.max_connections
            or not descriptors.room_for_a_connection()
        ):
            self._turn_away(writer)
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._connections += 1
        try:
            await self._request(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass  # the peer went away, or stopped reading: nothing to answer
        finally:
            self._connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            if task is not None:
                self._tasks.discard(task)

    def _turn_away(self, writer: asyncio.StreamWriter) -> None:
        """503 and close, without waiting for anything: the descriptor is free at once (what
        the kernel cannot take of the answer at once is dropped with the connection)."""
        self.turned_away += 1
        with contextlib.suppress(Exception):
            writer.write(_head(503, "text/plain", len(_TOO_MANY)) + _TOO_MANY)
        if writer.transport.get_write_buffer_size():
            writer.transport.abort()
        else:
            writer.close()

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self._answer(writer, 408, "text/plain", b"request head not received in time\n")
            return
        except (asyncio.LimitOverrunError, ValueError):
            await self._answer(writer, 431, "text/plain", b"request head too large\n")
            return
        method, _, rest = head.decode("latin-1").partition(" ")
        target = rest.partition(" ")[0].partition("?")[0]
        if method not in ("GET", "HEAD"):
            await self._answer(writer, 405, "text/plain", b"read-only: GET only\n")
            return
        body_wanted = method == "GET"
        if target == "/api/events" and body_wanted:
            await self._events(writer)
            return
        status, content_type, body = self._route(target)
        await self._answer(writer, status, content_type, body if body_wanted else b"", length=len(body))

    def _route(self, target: str) -> tuple[int, str, bytes]:
        if target in ("/", "/index.html"):
            return 200, STATIC["index.html"], self._files["index.html"]
        if target.startswith("/static/") and target[len("/static/") :] in self._files:
            name = target[len("/static/") :]
            return 200, STATIC[name], self._files[name]
        if target == "/api/state":
            return 200, "application/json", _json(self.monitor.snapshot())
        if target == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.monitor.registry)
        if target == "/healthz":
            return 200, "text/plain", b"ok\n"
        return 404, "text/plain", b"not found\n"

    async def _events(self, writer: asyncio.StreamWriter) -> None:
        if self._streams >= self.config.max_streams:
            await self._answer(writer, 503, "text/plain", b"too many event streams\n")
            return
        self._streams += 1
        try:
            writer.write(
                (
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
                    f"Connection: close\r\n{SECURITY_HEADERS}\r\n"
                ).encode()
            )
            sent, quiet = -1, 0.0
            while True:
                stopping = self._stopping  # read before the snapshot: the last one is sent
                if self.monitor.version != sent:
                    snapshot = self.monitor.snapshot()
                    sent = snapshot["version"]
                    writer.write(b"data: " + _json(snapshot) + b"\n\n")
                    quiet = 0.0
                elif quiet >= KEEPALIVE_S:
                    writer.write(b": keepalive\n\n")
                    quiet = 0.0
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
                if stopping:
                    return
                await asyncio.sleep(EVENT_INTERVAL_S)
                quiet += EVENT_INTERVAL_S
        finally:
            self._streams -= 1

    @staticmethod
    async def _answer(
        writer: asyncio.StreamWriter,
        status: int,
        content_type: str,
        body: bytes,
        *,
        length: int | None = None,
    ) -> None:
        writer.write(_head(status, content_type, len(body) if length is None else length) + body)
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)


_TOO_MANY = b"too many connections\n"


def _head(status: int, content_type: str, length: int) -> bytes:
    return (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\nCache-Control: no-store\r\n"
        f"Connection: close\r\n{SECURITY_HEADERS}\r\n"
    ).encode()


def _json(document: Any) -> bytes:
    from .results import strict_json

    return strict_json(document, separators=(",", ":")).encode()


def _web_file(name: str) -> bytes:
    return resources.files("fedgrpc.server").joinpath("web", name).read_bytes()


async def _close(server: asyncio.AbstractServer) -> None:
    server.close()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 5)
