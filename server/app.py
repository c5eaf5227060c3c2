"""A whole server run: load the test set, build or resume the model, serve, drive the rounds."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType

import numpy as np
from fedgrpc.common import device
from fedgrpc.common.codec import DEFAULT_CHUNK_BYTES
from fedgrpc.common.config import RunSpec
from fedgrpc.common.data import describe, load_split, model_inputs
from fedgrpc.common.errors import ConfigError, DataError, RunFailedError
from fedgrpc.common.logs import human_bytes
from fedgrpc.server.auth import Authenticator, ServerTls
from fedgrpc.server.checkpoint import CheckpointStore, weights_digest
from fedgrpc.server.endpoint import EndpointConfig, GrpcEndpoint
from fedgrpc.server.limits import Limits
from fedgrpc.server.results import ClientReport, RoundRecord, RunResults
from fedgrpc.server.rounds import RoundCoordinator, RoundOutcome
from fedgrpc.server.servicer import DEFAULT_INFLIGHT_BYTES
from fedgrpc.server.strategy import make_strategy

log = logging.getLogger("fedgrpc.server")

#: RunSpec fields a resumed run must share with its checkpoint (rounds may be extended).
_RESUME_MUST_MATCH = ("num_clients", "partition_seed", "model", "batch_size", "local_epochs", "learning_rate")


@dataclass(frozen=True)
class RoundPolicy:
    """When a round may close without every client.

    A round closes as soon as all enrolled clients have reported. After `timeout_s` it closes
    with what it has, if that is at least `min_clients`; with fewer it keeps waiting. The first
    round opens when every client is ready, or after `join_timeout_s` with `min_clients`
    (clients start slowly: a TensorFlow import and a shard to load).
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
class ServerConfig:
    run: RunSpec = field(default_factory=RunSpec)
    host: str = "[::]"
    port: int = 50051
    data: str | None = None
    out_dir: Path = Path("results")
    strategy: str = "fedavg"
    trim_fraction: float = 0.2
    byzantine: int = 1
    tls: ServerTls | None = None
    tokens: dict[int, str] | None = None
    init_seed: int = 0
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    max_examples: int = 10_000_000
    eval_batch_size: int = 256
    limits: Limits = field(default_factory=Limits)
    finish_grace_s: float = 15.0
    record_updates: bool = False
    threads: int | None = None
    clients_per_round: int | None = None  # None: every enrolled client trains every round
    sample_seed: int = 0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_inflight_bytes: int = DEFAULT_INFLIGHT_BYTES
    spool_dir: Path | None = None  # stage updates being received on disk (see fedgrpc.server.spool)


#: A round whose new weights are not finite is trained again from the same weights; after this
#: many in a row the server stops, keeping the last good checkpoint.
MAX_ABORTED_ROUNDS = 3


class FederatedServer:
    """Runs one federated job from start (or its last checkpoint) to finish."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.results = RunResults(config.out_dir)
        self.checkpoints = CheckpointStore(config.out_dir / "checkpoint")
        self.port = 0
        self.records: list[RoundRecord] = []
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
        cfg = self.config
        strategy = make_strategy(cfg.strategy, trim_fraction=cfg.trim_fraction, num_byzantine=cfg.byzantine)
        checkpoint = self.checkpoints.load()  # a damaged checkpoint stops us here, before anything else
        minimum = cfg.policy.minimum(cfg.run)
        if cfg.strategy == "krum" and minimum <= cfg.byzantine + 2:
            raise ConfigError(
                f"krum with --byzantine {cfg.byzantine} needs rounds of more than "
                f"{cfg.byzantine + 2} updates; "
                f"raise --min-clients (now {minimum}) or lower --byzantine"
            )
        log.info("devices: %s", device.configure(cfg.threads))
        import keras
        from fedgrpc.common.models import build_model, weight_specs

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
        weights: list[np.ndarray] = model.get_weights()
        first_round = 1
        if checkpoint is not None:
            run = self._resumable(run, checkpoint.run)
            weights, self.records, first_round = (
                checkpoint.weights,
                list(checkpoint.history),
                checkpoint.round + 1,
            )
            log.info(
                "resuming run %s after round %d (weights %s)",
                run.run_id,
                checkpoint.round,
                checkpoint.digest[:12],
            )
        log.info("model %s: %d tensors, %d parameters", run.model, len(specs), sum(s.size for s in specs))

        recorder = None
        if cfg.record_updates:

            def recorder(round_number: int, client_id: int, arrays: object) -> None:
                self.results.record_update(round_number, client_id, specs, arrays)  # type: ignore[arg-type]

        coordinator = RoundCoordinator(
            run,
            specs,
            strategy,
            max_examples=cfg.max_examples,
            recorder=recorder,
            clients_per_round=cfg.clients_per_round,
            sample_seed=cfg.sample_seed,
        )
        self._coordinator = coordinator
        if self._stop_requested.is_set():
            coordinator.interrupt()
        if checkpoint is None:
            # The run's identity (id, spec, initial weights) is on disk before any client can
            # join it: a server killed at any moment from now on, round 1 included, resumes
            # this same run, and its clients carry on with it.
            self.checkpoints.save(run, 0, weights, [])
        mutual_tls = cfg.tls is not None and cfg.tls.client_ca is not None
        endpoint = GrpcEndpoint(
            coordinator,
            EndpointConfig(
                host=cfg.host,
                port=cfg.port,
                tls=cfg.tls,
                authenticator=Authenticator(cfg.tokens, mutual_tls=mutual_tls),
                limits=cfg.limits,
                chunk_bytes=cfg.chunk_bytes,
                max_inflight_bytes=cfg.max_inflight_bytes,
                spool_dir=cfg.spool_dir,
            ),
        )
        self.port = endpoint.start()
        if cfg.tls is not None:
            what = "mutual TLS" if mutual_tls else "TLS"
            log.info(
                "%s on, client identity from %s",
                what,
                "tokens" if cfg.tokens else "certificates" if mutual_tls else "nothing",
            )
        else:
            log.warning(
                "INSECURE: no TLS%s; use this only on a network you trust",
                "" if cfg.tokens else ", no client tokens",
            )
        endpoint.set_serving(True)
        log.info(
            "run %s: %d rounds, %d clients, listening on port %d",
            run.run_id,
            run.rounds,
            run.num_clients,
            self.port,
        )
        if cfg.spool_dir is not None:
            log.info("updates being received are staged on disk in %s", cfg.spool_dir)
        finished = False
        try:
            if first_round <= run.rounds:
                self._wait_for_clients(coordinator, run, minimum)
            number, aborted = first_round, 0
            while number <= run.rounds and not coordinator.interrupted:
                round_started = time.monotonic()
                start_digest = weights_digest(weights)
                coordinator.open_round(number, weights)
                expected = coordinator.expected
                if not self._collect(coordinator, expected, number, min(minimum, expected)):
                    break
                outcome = coordinator.close_round()
                if not _all_finite(outcome.weights):
                    aborted += 1
                    self._log_aborted(outcome, aborted)
                    if aborted >= MAX_ABORTED_ROUNDS:
                        raise RunFailedError(
                            f"{aborted} rounds in a row produced non-finite weights; stopping. The "
                            f"checkpoint after round {number - 1} is intact: leave out the clients named "
                            "above, or use a robust --strategy, and start the server again to resume"
                        )
                    continue  # the same round again, from the same weights
                aborted = 0
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
                    start_digest=start_digest,
                    end_digest=weights_digest(weights),
                )
                self.records.append(record)
                self.checkpoints.save(run, number, weights, self.records)
                self.results.write_history(run, self.records, finished=False)
                log.info(
                    "round %d/%d  acc %.4f  loss %.3f  %.1f s  up %s  down %s  clients %d/%d",
                    number, run.rounds, record.accuracy, record.loss, record.seconds,
                    human_bytes(record.bytes_in), human_bytes(record.bytes_out),
                    len(outcome.updates), expected,
                )  # fmt: skip
                number += 1
            if coordinator.interrupted:
                log.info(
                    "stopped after round %d; restart with the same --out to resume",
                    self.records[-1].round if self.records else 0,
                )
                return self.records
            model.set_weights(weights)
            model.optimizer.build(
                model.trainable_variables
            )  # saved with fresh Adam slots: loads without warnings
            model.save(self.results.model_path)
            self.results.write_history(run, self.records, finished=True)
            self.results.plot(self.records)
            coordinator.finish()
            finished = True
            log.info("run finished: results in %s", cfg.out_dir)
            clients = list(range(1, run.num_clients + 1))
            if not coordinator.wait_told_finished(clients, cfg.finish_grace_s):
                log.warning(
                    "some clients were not told that the run finished within %.0f s", cfg.finish_grace_s
                )
        finally:
            endpoint.set_serving(False)
            if not finished:
                # Stopping, not finishing: clients are told nothing of the kind; their calls
                # end with the server and they retry until it is back.
                coordinator.interrupt()
            endpoint.stop(grace=2.0)
        return self.records

    @staticmethod
    def _log_aborted(outcome: RoundOutcome, aborted: int) -> None:
        suspects = sorted(outcome.updates, key=lambda u: u.largest_change, reverse=True)
        named = ", ".join(
            f"client {u.client_id} (n={u.num_examples}, largest weighted change {u.largest_change:.3g})"
            for u in suspects
        )
        log.error(
            "round %d aborted (%d in a row): the new global weights would not be finite; the weights "
            "stay as they were and the round is trained again. Updates, largest first: %s",
            outcome.round, aborted, named,
        )  # fmt: skip

    def _wait_for_clients(self, coordinator: RoundCoordinator, run: RunSpec, minimum: int) -> None:
        """Block until round one may open: `minimum` clients ready, then the rest or the round timeout."""
        log.info("waiting for %d clients to be ready", run.num_clients)
        coordinator.wait_ready(minimum)
        if coordinator.interrupted or coordinator.wait_ready(
            run.num_clients, self.config.policy.join_timeout_s
        ):
            return
        log.info(
            "starting with %d of %d clients ready; the others join from the round after they arrive",
            coordinator.ready_clients, run.num_clients,
        )  # fmt: skip

    def _collect(self, coordinator: RoundCoordinator, expected: int, number: int, minimum: int) -> bool:
        """Wait until the open round may close; False when the server is stopping."""
        timeout = self.config.policy.timeout_s
        if coordinator.wait_for_updates(expected, timeout):
            return True
        if coordinator.interrupted:
            return False
        got = coordinator.received
        if got >= minimum:
            log.info(
                "round %d: closing after %.0f s with %d of %d updates", number, timeout or 0, got, expected
            )
            return True
        log.warning(
            "round %d: %d of %d updates after %.0f s, fewer than --min-clients %d; waiting for more",
            number, got, expected, timeout or 0, minimum,
        )  # fmt: skip
        return coordinator.wait_for_updates(minimum)

    @staticmethod
    def _resumable(wanted: RunSpec, saved: RunSpec) -> RunSpec:
        for name in _RESUME_MUST_MATCH:
            if getattr(wanted, name) != getattr(saved, name):
                raise ConfigError(
                    f"the checkpoint in --out is of a run with {name}={getattr(saved, name)!r}, "
                    f"not {getattr(wanted, name)!r}; use the same settings to resume, or another --out"
                )
        return replace(saved, rounds=wanted.rounds, compression=wanted.compression)  # both may change


def _all_finite(weights: Sequence[np.ndarray]) -> bool:
    return all(np.isfinite(w).all() for w in weights if np.issubdtype(np.asarray(w).dtype, np.floating))
