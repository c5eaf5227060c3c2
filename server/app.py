"""A whole server run: set it up, serve it, drive its rounds, keep their record.

The parts: server.startup loads the task and builds or resumes the model, the strategy, the
round coordinator and the gRPC endpoint; server.driver drives the rounds and publishes what
happens (server.events) to the sinks that keep the run's record: checkpoints
(server.checkpoint), history.json and the curves (server.results), the dashboard and
Prometheus metrics (server.monitor), TensorBoard scalars (server.tensorboard).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from fedgrpc.common.codec import DEFAULT_CHUNK_BYTES
from fedgrpc.common.config import DEFAULT_TASK, RunSpec, SecAggSpec
from fedgrpc.common.errors import ConfigError
from fedgrpc.server.auth import ServerTls
from fedgrpc.server.checkpoint import CheckpointSink, CheckpointStore
from fedgrpc.server.driver import RoundDriver
from fedgrpc.server.endpoint import GrpcEndpoint
from fedgrpc.server.events import EventBus, RunClosed, RunStarted
from fedgrpc.server.http import DashboardServer, HttpConfig
from fedgrpc.server.limits import Limits
from fedgrpc.server.monitor import Monitor, MonitorSink
from fedgrpc.server.results import ResultsSink, RoundRecord, RunResults
from fedgrpc.server.rounds import RoundCoordinator
from fedgrpc.server.servicer import DEFAULT_INFLIGHT_BYTES
from fedgrpc.server.startup import (
    Job,
    load_job,
    make_coordinator,
    make_run_strategy,
    privacy_accountant,
    round_minimum,
    start_endpoint,
)
from fedgrpc.server.strategy import StrategySettings, strategy_record

log = logging.getLogger("fedgrpc.server")


@dataclass(frozen=True)
class RoundPolicy:
    """When a round may close without every client.

    A round closes as soon as all enrolled clients have reported. After `timeout_s` it closes
    with what it has, if that is at least `min_clients`; with fewer it keeps waiting, unless
    withdrawals left fewer than `min_clients` clients: then the run stops (RunFailedError). The first
    round opens when every client is ready, or after `join_timeout_s` with `min_clients`
    (clients start slowly: a TensorFlow import and a shard to load). Federated evaluations
    close when every asked client has reported, or after `timeout_s` with what came.
    """

    min_clients: int | None = None  # None: all enrolled clients
    timeout_s: float | None = None  # None: wait for everyone, however long
    join_timeout_s: float = 120.0  # how long the first round waits for every client to be ready

    def minimum(self, run: RunSpec) -> int:
        wanted = run.num_clients if self.min_clients is None else self.min_clients
        if not 1 <= wanted <= run.num_clients:
            raise ConfigError(f"--min-clients must be in 1..{run.num_clients}, got {wanted}")
        return wanted


@dataclass(frozen=True)
class PrivacySettings:
    """Central DP-FedAvg (fedgrpc.common.privacy): clip, noise, and the budget to stop at."""

    clip: float
    noise_multiplier: float
    clip_on: str = "client"  # client: clients clip (works under secure aggregation); server: it does
    delta: float = 1e-5
    target_epsilon: float | None = None  # stop before a round would spend more

    def __post_init__(self) -> None:
        if self.clip_on not in ("client", "server"):
            raise ConfigError(f"--dp-clip-on must be client or server, got {self.clip_on!r}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ConfigError(f"--dp-target-epsilon must be positive, got {self.target_epsilon}")


@dataclass(frozen=True)
class ServerConfig:
    run: RunSpec = field(default_factory=RunSpec)
    task: str = DEFAULT_TASK  # a task file, module:attribute or installed name (--task)
    task_params: Mapping[str, Any] = field(default_factory=dict)  # overrides of the task's defaults
    init_model: Path | None = None  # start from this saved Keras model's weights
    federated_eval: bool | None = None  # None: federated evaluation when there is no central test set
    host: str = "[::]"
    port: int = 50051
    data: str | None = None
    out_dir: Path = Path("results")
    strategy: StrategySettings = field(default_factory=StrategySettings)
    privacy: PrivacySettings | None = None
    secagg: SecAggSpec | None = None  # secure aggregation (fedgrpc.server.secagg)
    secagg_timeout_s: float = 60.0  # how long each key stage and the unmasking wait for clients
    client_sampling: str = "fixed"  # with --clients-per-round: fixed-size samples, or poisson
    tls: ServerTls | None = None
    tokens: dict[int, str] | None = None
    init_seed: int = 0
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    max_examples: int = 10_000_000
    limits: Limits = field(default_factory=Limits)
    finish_grace_s: float = 15.0
    record_updates: bool = False
    threads: int | None = None
    clients_per_round: int | None = None  # None: every enrolled client trains every round
    sample_seed: int = 0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_inflight_bytes: int = DEFAULT_INFLIGHT_BYTES
    spool_dir: Path | None = None  # stage updates being received on disk (see fedgrpc.server.spool)
    http: HttpConfig | None = None  # the dashboard and /metrics (fedgrpc.server.http)
    tensorboard: Path | None = None  # write TensorBoard scalars there
    health_port: int | None = None  # plain-text health checks on this port too (probes)


class FederatedServer:
    """Runs one federated job from start (or its last checkpoint) to finish."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.results = RunResults(config.out_dir)
        self.checkpoints = CheckpointStore(config.out_dir / "checkpoint")
        self.port = 0
        self.records: list[RoundRecord] = []
        self.monitor: Monitor | None = None
        self.dashboard: DashboardServer | None = None
        self._coordinator: RoundCoordinator | None = None
        self._stop_requested = threading.Event()

    def request_stop(self, signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        """Stop after the step in progress (a checkpoint being written is finished first)."""
        if not self._stop_requested.is_set():
            log.info(
                "%s received: stopping; the last complete round stays checkpointed",
                signal.Signals(signum).name,
            )
        self._stop_requested.set()
        if self._coordinator is not None:
            self._coordinator.interrupt()

    def run(self) -> list[RoundRecord]:
        driver, bus = self._set_up()
        endpoint = self._serve(driver.coordinator)
        try:
            self._drive(driver)
        finally:
            self._shut_down(driver, endpoint, bus)
        return self.records

    def _set_up(self) -> tuple[RoundDriver, EventBus]:
        """Everything before the endpoint opens; the errors of a bad start (flags that cannot be
        combined, a damaged checkpoint, a task that does not load) come from here."""
        cfg = self.config
        strategy = make_run_strategy(cfg)
        accountant = privacy_accountant(cfg)
        checkpoint = self.checkpoints.load()  # a damaged checkpoint stops us here, before anything else
        minimum = round_minimum(cfg)
        if checkpoint is not None:
            strategy.restore(checkpoint.strategy_state)  # the same optimizer trajectory, resumed
        job = load_job(cfg, checkpoint, self.results)
        self.records = job.history
        coordinator = make_coordinator(cfg, job, strategy, minimum, self.results)
        self._coordinator = coordinator
        if self._stop_requested.is_set():
            coordinator.interrupt()
        self.results.strategy = strategy_record(cfg.strategy, strategy)
        bus = self._sinks(job)
        resumed = checkpoint is not None
        history = tuple(job.history)
        bus.publish(RunStarted(job.run, resumed, job.weights, history, strategy.state(), job.declared_metric))
        log.info("strategy: %s", _described(self.results.strategy, secure=cfg.secagg is not None))
        driver = RoundDriver(cfg, job, coordinator, strategy, bus, accountant=accountant, minimum=minimum)
        return driver, bus

    def _sinks(self, job: Job) -> EventBus:
        """The run's record, in the order it is written: checkpoint, history, dashboard, TensorBoard."""
        cfg, stop = self.config, self._stop_requested
        self.monitor = Monitor(job.run, strategy=self.results.strategy)
        bus = EventBus(
            CheckpointSink(self.checkpoints, stop),
            ResultsSink(self.results, job.model, stop),
            MonitorSink(self.monitor),
        )
        if cfg.tensorboard is not None:
            from fedgrpc.server.tensorboard import TensorBoardWriter

            bus.subscribe(TensorBoardWriter(cfg.tensorboard))
        return bus

    def _serve(self, coordinator: RoundCoordinator) -> GrpcEndpoint:
        """The gRPC endpoint, then the dashboard."""
        cfg = self.config
        assert self.monitor is not None  # made with the sinks
        endpoint = start_endpoint(cfg, coordinator, self.monitor)
        self.port = endpoint.port
        if cfg.http is not None:
            self.dashboard = DashboardServer(self.monitor, cfg.http)
            http_port = self.dashboard.start()
            log.info(
                "dashboard on http://%s:%d/ (read-only; /metrics for Prometheus)", cfg.http.host, http_port
            )
        return endpoint

    def _drive(self, driver: RoundDriver) -> None:
        job = driver.job
        if job.first_round <= job.run.rounds:
            driver.wait_for_clients()
        driver.drive()
        if driver.coordinator.interrupted:
            log.info(
                "stopped after round %d; restart with the same --out to resume",
                self.records[-1].round if self.records else 0,
            )
            return
        driver.finish()
        if self.dashboard is not None:
            self.dashboard.linger(self._stop_requested)

    def _shut_down(self, driver: RoundDriver, endpoint: GrpcEndpoint, bus: EventBus) -> None:
        endpoint.servicer.refusals.log_summary()
        if self.dashboard is not None:
            self.dashboard.stop()
        bus.publish(RunClosed())
        endpoint.set_serving(False)
        if not driver.finished:
            # Stopping, not finishing: clients are told nothing of the kind; their calls
            # end with the server and they retry until it is back.
            driver.coordinator.interrupt()
        endpoint.stop(grace=2.0)


def _described(strategy: Mapping[str, Any], *, secure: bool) -> str:
    """'fedavgm (server_lr 0.1, momentum 0.9)': a strategy record for the log."""
    parameters = ", ".join(f"{k} {v:g}" for k, v in strategy.items() if k != "name")
    return f"{strategy['name']}{f' ({parameters})' if parameters else ''}" + (
        ", under secure aggregation" if secure else ""
    )
