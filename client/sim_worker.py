"""Many simulated clients in one process: the worker behind each Ray actor of `fl-sim`.

A SimWorker serves a set of client ids of a real run. Every id is a real client: its own
gRPC connection to the real fl-server, its own Join, long-poll, updates (secure aggregation
and DP included), run by the same code as `fl-client` (fedgrpc.client.app, a driver over
fedgrpc.client.session). What the ids share is the expensive part: one imported framework,
one built and compiled model, one LocalTrainer, used by one id at a time (a lock), each
bringing its own data (`{id}` in the data's path becomes the id, as with fl-local and
fl-client). Shards are read on the worker from the run spec's partition (stand-in
federations) and kept for the run, so no data moves through Ray.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..common import task_loader
from ..common.codec import TensorSpec
from ..common.config import RunSpec
from ..common.errors import FedGrpcError
from ..common.models import configure_devices
from ..common.settings import site_data
from ..common.task import LocalData, Site
from .app import ClientConfig, prepare_trainer, take_part
from .channel import wake_waiting_calls_every
from .connection import Connection
from .trainer import Evaluation, TrainResult

log = logging.getLogger("fedgrpc.client")


@dataclass
class WorkerReport:
    """What one worker did: rounds trained per client id, and the seconds spent training."""

    rounds: dict[int, int] = field(default_factory=dict)
    train_seconds: float = 0.0
    failures: dict[int, str] = field(default_factory=dict)


class SimWorker:
    """Serves client ids with one warm model (see the module's docstring)."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.loaded = task_loader.load_task(config.task)
        self._model_lock = threading.Lock()
        self._trainer: Any = None
        self._data: dict[int, LocalData] = {}
        self._report = WorkerReport()
        self._report_lock = threading.Lock()
        self.devices = configure_devices(self.loaded.task, config.threads)
        # One channel for every id this worker serves: gRPC gives each channel its own polling
        # thread, and thousands of them would keep the machine busy in the kernel.
        self._channel = config.security.channel(config.server)
        wake_waiting_calls_every(2.0)  # likewise for the threads that wait on calls, one per id

    def serve(self, client_ids: Sequence[int]) -> WorkerReport:
        """Take part in the run as every one of `client_ids`, until it is finished."""
        threads = [
            threading.Thread(target=self._client, args=(client_id,), name=f"client-{client_id}", daemon=True)
            for client_id in client_ids
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return self._report

    def _client(self, client_id: int) -> None:
        config = replace(self.config, client_id=client_id)
        try:
            with Connection(
                config.server,
                client_id,
                connect_timeout_s=config.connect_timeout_s,
                chunk_bytes=config.chunk_bytes,
                security=config.security,
                channel=self._channel,
            ) as connection:
                run, _ = connection.join(self.loaded.ref)
                site = _SiteTrainer(self, client_id, run)
                main = self.loaded.task.main_metric
                trained = take_part(connection, run, site, config, turn=site.turn, main_metric=main)
            with self._report_lock:
                self._report.rounds[client_id] = trained
        except FedGrpcError as exc:
            self._failed(client_id, exc)
        except Exception as exc:  # a bug or the task's own error: reported, never a silent thread death
            self._failed(client_id, exc)

    def _failed(self, client_id: int, exc: Exception) -> None:
        log.error("client %d: %s", client_id, exc)
        with self._report_lock:
            self._report.failures[client_id] = f"{type(exc).__name__}: {exc}"

    def trainer_for(self, client_id: int, run: RunSpec) -> Any:
        """The one trainer, holding `client_id`'s data (call with the model lock held)."""
        if self._trainer is None:
            own = replace(self.config, client_id=client_id, data=site_data(self.config.data, client_id))
            self._trainer = prepare_trainer(self.loaded, run, own)
            self._data[client_id] = self._trainer.data
        if client_id not in self._data:
            params = task_loader.check_params(self.loaded.task, run.task_params)
            site = Site(
                client_id=client_id,
                num_clients=run.num_clients,
                data=site_data(self.config.data, client_id),
                params=params,
                batch_size=run.batch_size,
                partition_seed=run.partition_seed,
                partition=run.partition,
            )
            self._data[client_id] = task_loader.load_data(self.loaded, site)
        self._trainer.use_data(self._data[client_id])
        return self._trainer

    @contextlib.contextmanager
    def holding_model(self) -> Iterator[float]:
        started = time.monotonic()
        with self._model_lock:
            waited = time.monotonic() - started
            began = time.monotonic()
            try:
                yield waited
            finally:
                with self._report_lock:
                    self._report.train_seconds += time.monotonic() - began


class _SiteTrainer:
    """One client id's view of the worker's trainer: its data swapped in while it trains."""

    specs: list[TensorSpec]

    def __init__(self, worker: SimWorker, client_id: int, run: RunSpec) -> None:
        self._worker, self._client_id, self._run = worker, client_id, run
        with worker.holding_model():
            self.specs = worker.trainer_for(client_id, run).specs

    @contextlib.contextmanager
    def turn(self) -> Iterator[float]:
        with self._worker.holding_model() as waited:
            yield waited

    def train(self, round_number: int, weights: Sequence[np.ndarray], **round_inputs: Any) -> TrainResult:
        """`round_inputs`: the round's settings, extras and state (LocalTrainer.train)."""
        result: TrainResult = self._worker.trainer_for(self._client_id, self._run).train(
            round_number, weights, **round_inputs
        )
        return result

    def evaluate(
        self, round_number: int, weights: Sequence[np.ndarray], personalize_epochs: int = 0
    ) -> Evaluation:
        evaluation: Evaluation = self._worker.trainer_for(self._client_id, self._run).evaluate(
            round_number, weights, personalize_epochs
        )
        return evaluation
