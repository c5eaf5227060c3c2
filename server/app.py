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
from types import FrameType
from typing import Any

from .checkpoint import CheckpointSink, CheckpointStore
from .config import PrivacySettings as PrivacySettings  # re-exported: callers found them here
from .config import RoundPolicy as RoundPolicy
from .config import ServerConfig as ServerConfig
from .driver import RoundDriver
from .endpoint import GrpcEndpoint
from .events import EventBus, RunClosed, RunStarted
from .http import DashboardServer
from .monitor import Monitor, MonitorSink
from .results import ResultsSink, RoundRecord, RunResults
from .rounds import RoundCoordinator
from .startup import (
    Job,
    load_job,
    make_coordinator,
    make_run_strategy,
    privacy_accountant,
    round_minimum,
    start_endpoint,
)
from .strategy import configure, strategy_record
from .strategy_loader import check_resumable

log = logging.getLogger("fedgrpc.server")


class FederatedServer:
    """Runs one federated job from start (or its last checkpoint) to finish; on an endpoint of
    its own, or on a standing federation's (`endpoint`, which outlives the run)."""

    def __init__(self, config: ServerConfig, endpoint: GrpcEndpoint | None = None) -> None:
        self.config = config
        self._shared_endpoint = endpoint
        self.results = RunResults(config.out_dir)
        self.checkpoints = CheckpointStore(config.out_dir / "checkpoint")
        self.port = 0
        self.records: list[RoundRecord] = []
        self.monitor: Monitor | None = None
        self.dashboard: DashboardServer | None = None
        self._coordinator: RoundCoordinator | None = None
        self._stop_requested = threading.Event()

    def request_stop(self, signum: int | None = signal.SIGTERM, frame: FrameType | None = None) -> None:
        """Stop after the step in progress (a checkpoint being written is finished first);
        `signum` None: asked by a standing federation's admin, not by a signal."""
        if not self._stop_requested.is_set():
            log.info(
                "%s: stopping; the last complete round stays checkpointed",
                "stop requested" if signum is None else f"{signal.Signals(signum).name} received",
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
        self.results.strategy = strategy_record(cfg.strategy, strategy)
        if checkpoint is not None:
            check_resumable(checkpoint.strategy, self.results.strategy)  # a user's file unchanged
            strategy.restore(checkpoint.strategy_state)  # the same optimizer trajectory, resumed
        job = load_job(cfg, checkpoint, self.results)
        configure(strategy, job.run)
        self.records = job.history
        coordinator = make_coordinator(cfg, job, strategy, minimum, self.results)
        self._coordinator = coordinator
        if self._stop_requested.is_set():
            coordinator.interrupt()
        bus = self._sinks(job)
        assert self.monitor is not None  # made with the sinks
        coordinator.watch_phase(self.monitor.phase)  # the monitor's phase is the coordinator's own
        resumed = checkpoint is not None
        history = tuple(job.history)
        bus.publish(RunStarted(job.run, resumed, job.weights, history, strategy.state(), job.declared_metric))
        log.info("strategy: %s", _described(self.results.strategy, secure=cfg.secagg is not None))
        driver = RoundDriver(cfg, job, coordinator, strategy, bus, accountant=accountant, minimum=minimum)
        return driver, bus

    def _sinks(self, job: Job) -> EventBus:
        """The run's record, in the order it is written: checkpoint, history, dashboard, TensorBoard."""
        cfg, stop = self.config, self._stop_requested
        mode = "sync" if cfg.fedbuff is None else "fedbuff"
        self.monitor = Monitor(job.run, strategy=self.results.strategy, mode=mode)
        bus = EventBus(
            CheckpointSink(self.checkpoints, stop, self.results.strategy),
            ResultsSink(self.results, job.model, stop),
            MonitorSink(self.monitor),
        )
        if cfg.tensorboard is not None:
            from .tensorboard import TensorBoardWriter

            bus.subscribe(TensorBoardWriter(cfg.tensorboard))
        return bus

    def _serve(self, coordinator: RoundCoordinator) -> GrpcEndpoint:
        """The gRPC endpoint, then the dashboard."""
        cfg = self.config
        assert self.monitor is not None  # made with the sinks
        if self._shared_endpoint is not None:
            self._shared_endpoint.serve(coordinator, self.monitor)
            self.port = self._shared_endpoint.port
            return self._shared_endpoint
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
        if self._shared_endpoint is None:
            endpoint.set_serving(False)
        if not driver.finished:
            # Stopping, not finishing: clients are told nothing of the kind; their calls
            # end with the server and they retry until it is back.
            driver.coordinator.interrupt()
        if self._shared_endpoint is None:
            endpoint.stop(grace=2.0)
        else:
            endpoint.serve(None)  # the federation's endpoint stays up for the next job


def _described(strategy: Mapping[str, Any], *, secure: bool) -> str:
    """'fedavgm (server_lr 0.1, momentum 0.9)': a strategy record for the log; a user's strategy
    with its source and digest ('fednova (source fednova.py, digest 0123456789ab)')."""
    parameters = ", ".join(
        f"{k} {v[:12] if k == 'digest' else v}" if isinstance(v, str) else f"{k} {v:g}"
        for k, v in strategy.items()
        if k != "name"
    )
    return f"{strategy['name']}{f' ({parameters})' if parameters else ''}" + (
        ", under secure aggregation" if secure else ""
    )
