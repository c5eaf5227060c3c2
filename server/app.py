"""A whole server run: load the test set, build the model, serve, drive the rounds, save results."""

from __future__ import annotations

import logging
import time
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from fedgrpc.common import device
from fedgrpc.common.config import RunSpec
from fedgrpc.common.data import describe, load_split, model_inputs
from fedgrpc.common.errors import DataError
from fedgrpc.common.logs import human_bytes
from fedgrpc.server.results import ClientReport, RoundRecord, RunResults
from fedgrpc.server.rounds import RoundCoordinator
from fedgrpc.server.servicer import DEFAULT_MAX_WAIT_S, CoordinatorServicer
from fedgrpc.server.strategy import make_strategy
from fedgrpc.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger("fedgrpc.server")


@dataclass(frozen=True)
class ServerConfig:
    run: RunSpec = field(default_factory=RunSpec)
    host: str = "[::]"
    port: int = 50051
    data: str | None = None
    out_dir: Path = Path("results")
    strategy: str = "fedavg"
    init_seed: int = 0
    eval_batch_size: int = 256
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    finish_grace_s: float = 15.0
    record_updates: bool = False
    threads: int | None = None


class FederatedServer:
    """Runs one federated job from start to finish; `port` is known once `start` returns."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.results = RunResults(config.out_dir)
        self.port = 0
        self.records: list[RoundRecord] = []

    def run(self) -> list[RoundRecord]:
        cfg = self.config
        log.info("devices: %s", device.configure(cfg.threads))
        import keras
        from fedgrpc.common.models import build_model, weight_specs

        strategy = make_strategy(cfg.strategy)
        started = time.monotonic()
        test = load_split(cfg.data, "test")
        if len(test) and int(test.y.max()) >= cfg.run.num_classes:
            raise DataError(
                f"test labels go up to {int(test.y.max())}, but the run has {cfg.run.num_classes} classes"
            )
        x_test, y_test = model_inputs(test, cfg.run.num_classes)
        run = replace(cfg.run, input_shape=tuple(int(d) for d in x_test.shape[1:]))
        log.info(
            "test set: %d examples from %s (%.1f s)",
            len(test),
            describe(cfg.data),
            time.monotonic() - started,
        )

        keras.utils.set_random_seed(cfg.init_seed)
        model = build_model(run.model, run.input_shape, run.num_classes, learning_rate=run.learning_rate)
        specs = weight_specs(model)
        weights = model.get_weights()
        log.info("model %s: %d tensors, %d parameters", run.model, len(specs), sum(s.size for s in specs))

        recorder = None
        if cfg.record_updates:

            def recorder(round_number: int, client_id: int, arrays: object) -> None:
                self.results.record_update(round_number, client_id, specs, arrays)  # type: ignore[arg-type]

        coordinator = RoundCoordinator(run, specs, strategy, recorder=recorder)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2 * run.num_clients + 8))
        pb_grpc.add_CoordinatorServicer_to_server(
            CoordinatorServicer(coordinator, max_wait_s=cfg.max_wait_s), server
        )
        self.port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        server.start()
        log.info(
            "run %s: %d rounds, %d clients, listening on port %d",
            run.run_id,
            run.rounds,
            run.num_clients,
            self.port,
        )
        try:
            log.info("waiting for %d clients to be ready", run.num_clients)
            coordinator.wait_ready(run.num_clients)
            for number in range(1, run.rounds + 1):
                round_started = time.monotonic()
                coordinator.open_round(number, weights)
                coordinator.wait_complete()
                outcome = coordinator.close_round()
                weights = outcome.weights
                model.set_weights(weights)
                loss, accuracy = model.evaluate(x_test, y_test, batch_size=cfg.eval_batch_size, verbose=0)
                record = RoundRecord(
                    round=number,
                    accuracy=float(accuracy),
                    loss=float(loss),
                    seconds=round(time.monotonic() - round_started, 3),
                    bytes_in=outcome.bytes_in,
                    bytes_out=outcome.bytes_out,
                    clients=[
                        ClientReport(u.client_id, u.num_examples, dict(u.metrics)) for u in outcome.updates
                    ],
                )
                self.records.append(record)
                self.results.write_history(run, self.records, finished=False)
                log.info(
                    "round %d/%d  acc %.4f  loss %.3f  %.1f s  up %s  down %s  clients %d/%d",
                    number, run.rounds, record.accuracy, record.loss, record.seconds,
                    human_bytes(record.bytes_in), human_bytes(record.bytes_out),
                    len(outcome.updates), run.num_clients,
                )  # fmt: skip
            coordinator.finish()
            model.optimizer.build(
                model.trainable_variables
            )  # saved with fresh Adam slots: loads without warnings
            model.save(self.results.model_path)
            self.results.write_history(run, self.records, finished=True)
            self.results.plot(self.records)
            log.info("run finished: results in %s", cfg.out_dir)
            clients = list(range(1, run.num_clients + 1))
            if not coordinator.wait_told_finished(clients, cfg.finish_grace_s):
                log.warning(
                    "some clients were not told that the run finished within %.0f s", cfg.finish_grace_s
                )
        finally:
            coordinator.finish()
            server.stop(grace=2.0).wait()
        return self.records
