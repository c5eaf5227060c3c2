"""What the coordinator is doing, for people and machines: the live state behind the web
dashboard, the Prometheus metrics and the TensorBoard scalars.

    servicer (calls) ──┐
    driver (rounds) ───┼──> Monitor ──> snapshot() (JSON) ──> dashboard, /api/state, /api/events
    refusal log ───────┘        └────> prometheus registry ──> /metrics

Each client's state moves joined -> waiting -> downloading -> training -> uploading ->
submitted (-> evaluating -> evaluated) and back to waiting; refused and late mark a round that
went wrong for it, withdrawn a client that said it cannot take part. Training time is what lies
between the end of a client's download and the start of its upload. Every method takes one lock
briefly and does O(1) work: observing a run never slows it. Everything a client sent that
appears here (metric names, messages) was checked before it was stored, and the dashboard shows
it as text, never as markup.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from ..common.config import RunSpec
from .events import Event, RoundClosed, RunStarted
from .phases import Phase, PhaseChange

#: Per client, the rounds whose timeline is kept (the dashboard's strip shows the last few).
TIMELINE_ROUNDS = 8
#: Refusals kept for the dashboard, most recent first.
RECENT_REFUSALS = 50
#: Clients listed one by one in a snapshot; beyond this only their counts by state.
LISTED_CLIENTS = 200


@dataclass
class _Span:
    round: int
    kind: str  # download, train, upload, evaluate
    start: float
    end: float | None = None


@dataclass
class _Client:
    client_id: int
    address: str = ""
    state: str = "joined"
    joined_at: float = 0.0
    last_seen: float = 0.0
    rounds_trained: int = 0
    spans: deque[_Span] = field(default_factory=lambda: deque(maxlen=4 * TIMELINE_ROUNDS))

    def view(self, now: float) -> dict[str, Any]:
        return {
            "id": self.client_id,
            "address": self.address,
            "state": self.state,
            "last_seen_s": round(now - self.last_seen, 1) if self.last_seen else None,
            "rounds_trained": self.rounds_trained,
            "timeline": [
                {"round": s.round, "kind": s.kind, "start": s.start, "end": s.end} for s in self.spans
            ],
        }


class Monitor:
    """The run as it goes: clients, rounds, bytes, refusals; and the Prometheus metrics of it."""

    def __init__(
        self,
        run: RunSpec,
        *,
        strategy: Mapping[str, Any] | None = None,
        mode: str = "sync",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`mode`: --mode; under fedbuff a round is a model version, and a client still training
        when one closes is not late (it trains on, for a later version)."""
        self._lock = threading.Lock()
        self._clock = clock
        self.run = run
        self.strategy = dict(strategy or {"name": "fedavg"})  # fedgrpc.server.strategy.strategy_record
        self.mode = mode
        self.started = clock()
        self.version = 0  # bumped on every change: the dashboard's stream sends when it moves
        self._phase = Phase.WAITING
        self._round = 0
        self._round_started: float | None = None
        self._clients: dict[int, _Client] = {}
        self._rounds: list[dict[str, Any]] = []
        self._refusals: deque[dict[str, Any]] = deque(maxlen=RECENT_REFUSALS)
        self._refusals_by_code: dict[str, int] = {}
        self._withdrawals: deque[dict[str, Any]] = deque(maxlen=RECENT_REFUSALS)
        self.registry = CollectorRegistry()
        self._define_metrics()
        self._metrics["clients_connected"].set_function(self.connected)

    # -- events --------------------------------------------------------------------------

    def client_joined(self, client_id: int, address: str) -> None:
        with self._lock:
            client = self._client(client_id)
            client.address, client.state = address, "joined"
            client.joined_at = client.last_seen = self._clock()
            self._changed()

    def task_started(self, client_id: int, round_number: int, kind: str) -> None:
        """The server began sending a TRAIN ("download") or EVALUATE ("evaluate") task."""
        with self._lock:
            client = self._client(client_id)
            now = self._clock()
            client.state, client.last_seen = ("downloading" if kind == "download" else "evaluating"), now
            client.spans.append(_Span(round_number, kind, now))
            self._changed()

    def task_sent(self, client_id: int, round_number: int, nbytes: int) -> None:
        with self._lock:
            client = self._client(client_id)
            now = self._clock()
            span = self._open_span(client, round_number, ("download", "evaluate"))
            if span is not None and span.kind == "download":
                span.end = now
                client.state = "training"
                client.spans.append(_Span(round_number, "train", now))
            client.last_seen = now
            self._metrics["bytes_sent"].inc(nbytes)
            self._changed()

    def waiting(self, client_id: int, *, finished: bool = False) -> None:
        """The client was told to wait (or, `finished`, that the run is over)."""
        with self._lock:
            client = self._client(client_id)
            client.last_seen = self._clock()
            if finished:
                client.state = "finished"
                self._changed()
            elif client.state in ("joined", "submitted", "evaluated", "refused", "late", "withdrawn"):
                client.state = "waiting"
                self._changed()

    def upload_started(self, client_id: int, round_number: int) -> None:
        with self._lock:
            client = self._client(client_id)
            now = self._clock()
            training = self._open_span(client, round_number, ("train",))
            if training is not None:
                training.end = now
            client.state, client.last_seen = "uploading", now
            client.spans.append(_Span(round_number, "upload", now))
            self._changed()

    def update_accepted(self, client_id: int, round_number: int, nbytes: int) -> None:
        with self._lock:
            client = self._client(client_id)
            now = self._clock()
            upload = self._open_span(client, round_number, ("upload",))
            if upload is not None:
                upload.end = now
            client.state, client.last_seen = "submitted", now
            client.rounds_trained += 1
            self._metrics["updates_accepted"].inc()
            self._metrics["bytes_received"].inc(nbytes)
            self._changed()

    def evaluation_reported(self, client_id: int, round_number: int) -> None:
        with self._lock:
            client = self._client(client_id)
            now = self._clock()
            span = self._open_span(client, round_number, ("evaluate",))
            if span is not None:
                span.end = now
            client.state, client.last_seen = "evaluated", now
            self._changed()

    def call_ended_early(self) -> None:
        """A call its client ended (cancelled, deadline passed, connection closed) before it was answered."""
        self._metrics["calls_ended_early"].inc()

    def refused(self, address: str, code: str, what: str, message: str, client_id: int | None = None) -> None:
        with self._lock:
            now = self._clock()
            self._refusals.appendleft(
                {"time": now, "address": address, "code": code, "what": what, "message": message[:500]}
            )
            self._refusals_by_code[code] = self._refusals_by_code.get(code, 0) + 1
            self._metrics["updates_refused"].labels(code=code).inc()
            if client_id is not None and client_id in self._clients:
                client = self._clients[client_id]
                for span in client.spans:
                    if span.end is None:
                        span.end = now
                client.state = "refused"
            self._changed()

    def withdrew(self, address: str, client_id: int, reason: str) -> None:
        """The client said it cannot take part: no refusal (it asked), so counted apart."""
        with self._lock:
            now = self._clock()
            self._withdrawals.appendleft(
                {"time": now, "address": address, "client_id": client_id, "reason": reason[:500]}
            )
            self._metrics["withdrawals"].inc()
            client = self._client(client_id)
            for span in client.spans:
                if span.end is None:
                    span.end = now
            client.state, client.last_seen = "withdrawn", now
            self._changed()

    def phase(self, change: PhaseChange) -> None:
        """The coordinator entered a phase (RoundCoordinator.watch_phase)."""
        with self._lock:
            now = self._clock()
            if change.phase is Phase.TRAINING and self._phase is not Phase.TRAINING:
                self._round_started = now
            if change.phase is Phase.AGGREGATING and change.expected is not None and self.mode == "sync":
                for client_id in change.expected:  # expected this round, no update in: late
                    client = self._clients.get(client_id)
                    if client is not None and client.state in ("downloading", "training", "uploading"):
                        client.state = "late"
            self._phase, self._round = change.phase, change.round
            self._metrics["round"].set(change.round)
            self._changed()

    def round_recorded(self, record: Mapping[str, Any], main_metric: str) -> None:
        """A finished round, as history.json has it."""
        with self._lock:
            self._rounds.append(
                {
                    "round": record["round"],
                    "seconds": record["seconds"],
                    "bytes_in": record["bytes_in"],
                    "bytes_out": record["bytes_out"],
                    "clients": len(record["clients"]),
                    "central": record.get("central"),
                    "federated": (record.get("federated") or {}).get("metrics"),
                    "main": main_metric,
                }
            )
            if self.mode == "fedbuff":  # each update's staleness, for the version line
                self._rounds[-1]["staleness"] = sorted((record.get("staleness") or {}).values())
            self._metrics["rounds_completed"].inc()
            self._metrics["round_duration"].observe(record["seconds"])
            for source in ("central", "federated"):
                metrics = self._rounds[-1][source] or {}
                for name, value in metrics.items():
                    if value is not None:
                        self._metrics["evaluation"].labels(source=source, metric=name).set(value)
            self._changed()

    # -- reading ---------------------------------------------------------------------------

    def connected(self, within_s: float = 60.0) -> int:
        """Clients heard from in the last `within_s` seconds (a waiting long-poll counts: it is
        renewed every --max-wait seconds)."""
        with self._lock:
            now = self._clock()
            return sum(1 for c in self._clients.values() if now - c.last_seen <= within_s)

    def heard_from(self, client_id: int, within_s: float = 60.0) -> bool:
        """Whether this client called in the last `within_s` seconds (the federation view's
        sites online, while they take part in a job and do not announce)."""
        with self._lock:
            client = self._clients.get(client_id)
            return client is not None and self._clock() - client.last_seen <= within_s

    def snapshot(self) -> dict[str, Any]:
        """The whole state, JSON-ready (what /api/state answers and the dashboard draws)."""
        with self._lock:
            now = self._clock()
            durations = [r["seconds"] for r in self._rounds]
            remaining = self.run.rounds - len(self._rounds)
            eta = sum(durations) / len(durations) * remaining if durations else None
            states: dict[str, int] = {}
            for client in self._clients.values():
                states[client.state] = states.get(client.state, 0) + 1
            listed = sorted(self._clients.values(), key=lambda c: c.client_id)[:LISTED_CLIENTS]
            return {
                "version": self.version,
                "now": now,
                "run": {
                    "run_id": self.run.run_id,
                    "task": self.run.task.name,
                    "rounds": self.run.rounds,
                    "clients": self.run.num_clients,
                    "partition": self.run.partition,
                    "compression": self.run.compression,
                    "proximal_mu": self.run.proximal_mu,
                    "strategy": self.strategy,
                    "secagg": self.run.secagg is not None,
                    "mode": self.mode,
                },
                "state": {
                    "phase": self._phase.value,
                    "round": self._round,
                    "rounds_done": len(self._rounds),
                    "time_in_round_s": round(now - self._round_started, 1) if self._round_started else None,
                    "eta_s": round(eta, 1) if eta is not None else None,
                    "uptime_s": round(now - self.started, 1),
                },
                "clients": {
                    "by_state": states,
                    "listed": [c.view(now) for c in listed],
                    "total": len(self._clients),
                },
                "rounds": list(self._rounds),
                "refusals": {"recent": list(self._refusals), "by_code": dict(self._refusals_by_code)},
                "withdrawals": {"recent": list(self._withdrawals)},
            }

    # -- internals (lock held) ---------------------------------------------------------------

    def _client(self, client_id: int) -> _Client:
        client = self._clients.get(client_id)
        if client is None:
            client = self._clients[client_id] = _Client(client_id, joined_at=self._clock())
            self._metrics["clients_seen"].set(len(self._clients))
        return client

    @staticmethod
    def _open_span(client: _Client, round_number: int, kinds: tuple[str, ...]) -> _Span | None:
        for span in reversed(client.spans):
            if span.round == round_number and span.kind in kinds and span.end is None:
                return span
        return None

    def _changed(self) -> None:
        self.version += 1

    def _define_metrics(self) -> None:
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds
        self._metrics: dict[str, Any] = {
            "rounds_completed": Counter(
                "fedgrpc_rounds_completed_total", "Rounds aggregated and recorded", registry=r
            ),
            "round_duration": Histogram(
                "fedgrpc_round_duration_seconds",
                "Wall time of a round: open to recorded",
                buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
                registry=r,
            ),
            "round": Gauge("fedgrpc_round", "The round open now (or last opened)", registry=r),
            "bytes_received": Counter(
                "fedgrpc_received_bytes_total", "Update bytes accepted from clients", registry=r
            ),
            "bytes_sent": Counter("fedgrpc_sent_bytes_total", "Weight bytes sent to clients", registry=r),
            "updates_accepted": Counter(
                "fedgrpc_updates_accepted_total",
                "Updates accepted by SubmitUpdate (under secure aggregation, counted or not)",
                registry=r,
            ),
            "updates_refused": Counter(
                "fedgrpc_refusals_total", "Calls refused, by gRPC status code", ["code"], registry=r
            ),
            "withdrawals": Counter(
                "fedgrpc_withdrawals_total",
                "Withdraw calls accepted: clients that said they cannot take part (not refusals)",
                registry=r,
            ),
            "calls_ended_early": Counter(
                "fedgrpc_calls_ended_early_total",
                "Calls their client ended before they were answered (cancelled, deadline, connection closed)",
                registry=r,
            ),
            "clients_seen": Gauge("fedgrpc_clients_seen", "Clients that have called this server", registry=r),
            "clients_connected": Gauge(
                "fedgrpc_clients_connected", "Clients heard from in the last minute", registry=r
            ),
            "evaluation": Gauge(
                "fedgrpc_evaluation",
                "The last evaluation of the global model",
                ["source", "metric"],
                registry=r,
            ),
        }

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge read when scraped (in-flight bytes, fold queue depth, open calls, ...)."""
        Gauge(name, documentation, registry=self.registry).set_function(read)


class MonitorSink:
    """The driver's side of the monitor: finished rounds (a resumed run's past ones too, so that
    the dashboard shows the whole run). Phases come from the coordinator itself (watch_phase)."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def handle(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            for record in event.history:
                self.monitor.round_recorded(asdict(record), event.main_metric)
        elif isinstance(event, RoundClosed):
            self.monitor.round_recorded(asdict(event.record), event.main_metric)
