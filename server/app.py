"""A whole server run: load the task, build or resume the model, serve, drive the rounds.

Each round: open it, collect updates (see RoundPolicy), aggregate, check that the new
weights are finite (else the round is trained again from the same weights), evaluate
(centrally when the task gives the server a test set, federated when the evaluation plan
says so), write the checkpoint and history, print one line.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from fedgrpc.common import device, task_loader
from fedgrpc.common.codec import DEFAULT_CHUNK_BYTES
from fedgrpc.common.config import DEFAULT_TASK, RunSpec, SecAggSpec
from fedgrpc.common.errors import ConfigError, RunFailedError, SecAggError, TaskError
from fedgrpc.common.logs import human_bytes
from fedgrpc.common.privacy import PrivacyAccountant
from fedgrpc.common.task import Site
from fedgrpc.common.task_loader import LoadedTask
from fedgrpc.common.words import plural
from fedgrpc.server.auth import Authenticator, ServerTls
from fedgrpc.server.checkpoint import Checkpoint, CheckpointStore, weights_digest
from fedgrpc.server.endpoint import EndpointConfig, GrpcEndpoint
from fedgrpc.server.evaluation import CentralEvaluator, FederatedEvaluation, describe, main_metric
from fedgrpc.server.http import DashboardServer, HttpConfig
from fedgrpc.server.limits import Limits
from fedgrpc.server.masked_sum import SecAggStrategy
from fedgrpc.server.monitor import Monitor
from fedgrpc.server.results import ClientReport, FederatedRecord, RoundRecord, RunResults, persist
from fedgrpc.server.rounds import RoundCoordinator, RoundOutcome
from fedgrpc.server.secagg import SecAggRound
from fedgrpc.server.servicer import DEFAULT_INFLIGHT_BYTES
from fedgrpc.server.strategy import (
    ROBUST,
    CentralDP,
    FedAvg,
    Strategy,
    StrategySettings,
    make_strategy,
    strategy_record,
)

log = logging.getLogger("fedgrpc.server")

#: RunSpec fields a resumed run must share with its checkpoint (rounds may be extended).
_RESUME_MUST_MATCH = (
    "num_clients", "partition_seed", "partition", "batch_size", "local_epochs", "task", "task_params",
)  # fmt: skip

#: A round whose new weights are not finite is trained again from the same weights; after this
#: many in a row the server stops, keeping the last good checkpoint.
MAX_ABORTED_ROUNDS = 3
#: Under secure aggregation without --round-timeout, the longest the masked input waits for the
#: clients that shared keys (a client that vanished mid-round must not hold the round forever).
MASKED_INPUT_TIMEOUT_S = 600.0


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


@dataclass
class _Job:
    """What a run works with once it is set up."""

    loaded: LoadedTask
    run: RunSpec
    model: Any
    weights: list[np.ndarray]
    first_round: int
    central: CentralEvaluator | None


class FederatedServer:
    """Runs one federated job from start (or its last checkpoint) to finish."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.results = RunResults(config.out_dir)
        self.checkpoints = CheckpointStore(config.out_dir / "checkpoint")
        self.port = 0
        self.records: list[RoundRecord] = []
        self.monitor: Monitor | None = None
        self._accountant: PrivacyAccountant | None = None
        self.dashboard: DashboardServer | None = None
        self._tensorboard: Any = None
        self._coordinator: RoundCoordinator | None = None
        self._stop_requested = threading.Event()
        self._told_no_held_out = False

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
        per_round = cfg.clients_per_round or cfg.run.num_clients
        dp = cfg.privacy
        central_dp = None if dp is None else CentralDP(dp.clip, dp.noise_multiplier, per_round)
        strategy = make_strategy(cfg.strategy, central_dp)
        if cfg.secagg is not None:
            strategy = self._secure(strategy)
        self._accountant = None
        if dp is not None and dp.noise_multiplier > 0:
            sampling = "all" if per_round >= cfg.run.num_clients else cfg.client_sampling
            self._accountant = PrivacyAccountant(
                dp.noise_multiplier, dp.delta, sampling, cfg.run.num_clients, per_round
            )
        checkpoint = self.checkpoints.load()  # a damaged checkpoint stops us here, before anything else
        minimum = cfg.policy.minimum(cfg.run)
        byzantine = cfg.strategy.byzantine
        if cfg.strategy.name == "krum" and minimum <= byzantine + 2:
            raise ConfigError(
                f"krum with --byzantine {byzantine} needs rounds of more than {byzantine + 2} updates; "
                f"raise --min-clients (now {minimum}) or lower --byzantine"
            )
        if checkpoint is not None:
            strategy.restore(checkpoint.strategy_state)  # the same optimizer trajectory, resumed
        job = self._set_up(checkpoint)
        run = job.run
        from fedgrpc.common.models import weight_specs

        specs = weight_specs(job.model)
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
            sampling=cfg.client_sampling,
            secagg_timeout_s=cfg.secagg_timeout_s,
            min_clients=minimum,
        )
        self._coordinator = coordinator
        self.results.withdrawals = lambda: coordinator.withdrawals
        if self._stop_requested.is_set():
            coordinator.interrupt()
        if checkpoint is None:
            # The run's identity (id, spec, initial weights) is on disk before any client can
            # join it: a server killed at any moment from now on, round 1 included, resumes
            # this same run, and its clients carry on with it.
            initial = partial(self.checkpoints.save, run, 0, job.weights, [], strategy.state())
            if not persist("the run's first checkpoint", initial, stop=self._stop_requested):
                raise RunFailedError(f"no checkpoint can be written in {cfg.out_dir} (see above)")
        self.results.strategy = strategy_record(cfg.strategy, strategy)
        self.monitor = Monitor(run, strategy=self.results.strategy)
        coordinator.watch_phase(self.monitor.phase)  # the monitor's phase is the coordinator's
        log.info("strategy: %s", _described(self.results.strategy, secure=cfg.secagg is not None))
        for record in self.records:  # a resumed run shows its past rounds too
            self.monitor.round_recorded(asdict(record), job.loaded.task.main_metric or "accuracy")
        if cfg.tensorboard is not None:
            from fedgrpc.server.tensorboard import TensorBoardWriter

            self._tensorboard = TensorBoardWriter(cfg.tensorboard)
        endpoint = self._start_endpoint(coordinator)
        if cfg.http is not None:
            self.dashboard = DashboardServer(self.monitor, cfg.http)
            http_port = self.dashboard.start()
            log.info(
                "dashboard on http://%s:%d/ (read-only; /metrics for Prometheus)", cfg.http.host, http_port
            )
        finished = False
        try:
            if job.first_round <= run.rounds:
                self._wait_for_clients(coordinator, run, minimum)
            self._drive(job, coordinator, strategy, minimum)
            if coordinator.interrupted:
                log.info(
                    "stopped after round %d; restart with the same --out to resume",
                    self.records[-1].round if self.records else 0,
                )
                return self.records
            if not persist("the final model and history.json", lambda: self._save_results(job)):
                raise RunFailedError(
                    f"the results could not be written to {cfg.out_dir} (see above); the checkpoint "
                    "after the last round is intact: free what is missing and start the server again"
                )
            coordinator.finish()
            finished = True
            log.info("run finished: results in %s", cfg.out_dir)
            clients = list(range(1, run.num_clients + 1))
            if not coordinator.wait_told_finished(clients, cfg.finish_grace_s):
                log.warning(
                    "some clients were not told that the run finished within %.0f s", cfg.finish_grace_s
                )
            if self.dashboard is not None:
                self.dashboard.linger(self._stop_requested)
        finally:
            endpoint.servicer.refusals.log_summary()
            if self.dashboard is not None:
                self.dashboard.stop()
            if self._tensorboard is not None:
                self._tensorboard.close()
            endpoint.set_serving(False)
            if not finished:
                # Stopping, not finishing: clients are told nothing of the kind; their calls
                # end with the server and they retry until it is back.
                coordinator.interrupt()
            endpoint.stop(grace=2.0)
        return self.records

    # -- setting up ----------------------------------------------------------------

    def _secure(self, strategy: Strategy) -> SecAggStrategy:
        """The run's strategy under secure aggregation, or a ConfigError naming what cannot be
        combined with it: whatever needs to see one client's update."""
        cfg = self.config
        refusals = {
            f"--strategy {cfg.strategy.name} (a robust rule needs every update)": cfg.strategy.name in ROBUST,
            f"--compression {cfg.run.compression}": cfg.run.compression != "none",
            "--record-updates": cfg.record_updates,
            "--dp-clip-on server (clients clip instead: --dp-clip-on client)": (
                cfg.privacy is not None and cfg.privacy.clip_on == "server"
            ),
            "--client-sampling poisson (a round of fewer than 2 cannot be masked)": (
                cfg.client_sampling == "poisson" and cfg.clients_per_round is not None
            ),
        }
        refused = [flag for flag, present in refusals.items() if present]
        if refused:
            raise ConfigError(
                "secure aggregation shows the server only the sum of a round's updates, which rules out "
                + "; ".join(refused)
            )
        assert isinstance(strategy, FedAvg)
        return SecAggStrategy(strategy)

    def _secagg_spec(self) -> SecAggSpec | None:
        """The run's encoding: under DP every client weighs 1 and clips to dp_clip (L2, so every
        coordinate too): the ring then needs no more range than that."""
        spec, dp = self.config.secagg, self.config.privacy
        if spec is None or dp is None:
            return spec
        return replace(spec, bound=dp.clip, max_examples=1)

    def _set_up(self, checkpoint: Checkpoint | None) -> _Job:
        """The task, its model and central test set, and the weights to start from."""
        cfg = self.config
        loaded = task_loader.load_task(cfg.task)
        params = task_loader.resolve_params(loaded.task, cfg.task_params)
        log.info("task %s from %s (digest %s)", loaded.name, loaded.source, loaded.ref.digest[:12])
        log.info("devices: %s", device.configure(cfg.threads))
        import keras

        keras.utils.set_random_seed(cfg.init_seed)
        model = task_loader.build_model(loaded, params)
        site = Site(
            client_id=0,
            num_clients=cfg.run.num_clients,
            data=cfg.data,
            params=params,
            batch_size=cfg.run.batch_size,
            partition_seed=cfg.run.partition_seed,
            partition=cfg.run.partition,
        )
        started = time.monotonic()
        test = task_loader.load_test_data(loaded, site)
        central = None
        if test is not None:
            task_loader.check_fits(loaded, model, test, "test set")
            central = CentralEvaluator(loaded, model, test, params, cfg.run.batch_size)
            log.info(
                "central test set from %s loaded (%.1f s)", cfg.data or "the task", time.monotonic() - started
            )
        if loaded.task.partition_labels is not None and checkpoint is None:
            labels = task_loader.call(loaded, "partition_labels", loaded.task.partition_labels, site)
            summary = self.results.write_partition(cfg.run, np.asarray(labels))
            sizes = [c["examples"] for c in summary["clients"]]
            log.info(
                "partition %s: %d to %d examples a client (%s)",
                cfg.run.partition, min(sizes), max(sizes), self.results.out_dir / "partition.json",
            )  # fmt: skip
        federated = cfg.federated_eval if cfg.federated_eval is not None else central is None
        evaluation = cfg.run.evaluation
        if federated and evaluation.every == 0:
            evaluation = replace(evaluation, every=1)
        elif not federated:
            evaluation = replace(evaluation, every=0)
        run = replace(
            cfg.run,
            task=loaded.ref,
            task_params=params,
            evaluation=evaluation,
            proximal_mu=cfg.strategy.client_proximal_mu,
            dp_clip=cfg.privacy.clip if cfg.privacy is not None and cfg.privacy.clip_on == "client" else 0.0,
            secagg=self._secagg_spec(),
        )
        weights: list[np.ndarray] = (
            _weights_of_saved_model(cfg.init_model, model) if cfg.init_model else model.get_weights()
        )
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
        log.info(
            "model: %d tensors, %d parameters; evaluation: %s",
            len(weights),
            sum(int(np.size(w)) for w in weights),
            _evaluation_plan(central is not None, run),
        )
        if central is not None and first_round == 1:
            # While the clients start: the baseline, and the evaluation compiled for every batch
            # shape it will see, so that round 1 does not pay for it (on JAX, seconds).
            started = time.monotonic()
            initial = central(0, weights)
            main = main_metric(loaded.task.main_metric, initial)
            log.info("initial model: %s (%.1f s)", describe(main, initial, None), time.monotonic() - started)
        return _Job(loaded, run, model, weights, first_round, central)

    def _start_endpoint(self, coordinator: RoundCoordinator) -> GrpcEndpoint:
        cfg, run = self.config, coordinator.run
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
                health_port=cfg.health_port,
            ),
            monitor=self.monitor,
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
            "run %s: %s, %s, listening on port %d",
            run.run_id,
            plural(run.rounds, "round"),
            plural(run.num_clients, "client"),
            self.port,
        )
        if cfg.spool_dir is not None:
            log.info("updates being received are staged on disk in %s", cfg.spool_dir)
        return endpoint

    # -- the rounds ----------------------------------------------------------------

    def _drive(self, job: _Job, coordinator: RoundCoordinator, strategy: Strategy, minimum: int) -> None:
        run = job.run
        number, aborted = job.first_round, 0
        while number <= run.rounds and not coordinator.interrupted:
            dp = self.config.privacy
            epsilon = self._accountant.epsilon(number) if self._accountant is not None else None
            target = dp.target_epsilon if dp is not None else None
            if epsilon is not None and target is not None and epsilon > target:
                log.info(
                    "privacy budget: round %d would spend epsilon %.3f > --dp-target-epsilon %g; "
                    "the run ends after round %d",
                    number, epsilon, target, number - 1,
                )  # fmt: skip
                return
            round_started = time.monotonic()
            start_digest = weights_digest(job.weights)
            coordinator.open_round(number, job.weights)
            monitor = self._monitor()
            secure = coordinator.secure_round
            try:
                if secure is not None:
                    expected = self._secure_collect(coordinator, secure, number)
                else:
                    expected = coordinator.expected
                    floor = min(minimum, len(coordinator.participants(number)))  # a sample may be smaller
                    if not self._collect(coordinator, expected, number, floor):
                        return
                    if coordinator.received == 0 and floor > 0 and self.config.privacy is None:
                        log.warning(
                            "round %d: every sampled client withdrew before sending an update; "
                            "the round is sampled again among the others", number,
                        )  # fmt: skip
                        continue  # the same round again, from the same weights
                outcome = coordinator.close_round(allow_empty=self.config.privacy is not None)
            except SecAggError as exc:
                if coordinator.interrupted:
                    return
                if not (isinstance(strategy, SecAggStrategy) and strategy.progress):
                    aborted += 1  # one that narrowed down an offender or found a new dispute is no failure
                culprits = sorted(secure.culprits) if secure is not None else []
                coordinator.leave_out(culprits)
                self._secure_aborted(number, exc, aborted, culprits)
                continue  # the same round again, from the same weights, with fresh keys
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
            job.weights = outcome.weights
            central = job.central(number, job.weights) if job.central else None
            federated = None
            if run.evaluation.due(number, run.rounds):
                federated = self._federated_evaluation(coordinator, number, job.weights)
                if federated is None:
                    return  # interrupted
            record = RoundRecord(
                round=number,
                seconds=round(time.monotonic() - round_started, 3),
                bytes_in=outcome.bytes_in,
                bytes_out=outcome.bytes_out,
                clients=[ClientReport(u.client_id, u.num_examples, dict(u.metrics)) for u in outcome.updates],
                central=central,
                federated=federated,
                privacy=None if epsilon is None or dp is None else {"epsilon": epsilon, "delta": dp.delta},
                secagg=secure.summary() if secure is not None else None,
                start_digest=start_digest,
                end_digest=weights_digest(job.weights),
            )
            self.records.append(record)
            save = partial(self.checkpoints.save, run, number, job.weights, self.records, strategy.state())
            history = partial(self.results.write_history, run, self.records, finished=False)
            stop = self._stop_requested  # a checkpoint not written: the next round's holds this one's too
            persist(f"the checkpoint after round {number}", save, stop=stop)
            persist("history.json", history, stop=stop)
            fed_metrics = federated.metrics if federated else None
            reported = len(federated.reports) if federated is not None else None
            main = main_metric(job.loaded.task.main_metric, central, fed_metrics)
            as_dict = asdict(record)
            monitor.round_recorded(as_dict, main)
            if self._tensorboard is not None:
                self._tensorboard.round(as_dict)
            spent = f"  epsilon {epsilon:.3f}" if epsilon is not None else ""
            log.info(
                "round %d/%d  %s%s  %.1f s  up %s  down %s  clients %d/%d",
                number, run.rounds, describe(main, central, fed_metrics, reported=reported), spent,
                record.seconds, human_bytes(record.bytes_in), human_bytes(record.bytes_out),
                len(outcome.updates), expected,
            )  # fmt: skip
            number += 1

    def _federated_evaluation(
        self, coordinator: RoundCoordinator, number: int, weights: Sequence[np.ndarray]
    ) -> FederatedRecord | None:
        """Ask the clients to evaluate the new weights; None when the server is stopping."""
        plan = coordinator.run.evaluation
        asked = coordinator.open_evaluation(number, weights, plan.fraction)
        if not coordinator.wait_for_evaluations(asked, self.config.policy.timeout_s):
            if coordinator.interrupted:
                return None
            log.info("round %d: evaluation closed after %.0f s", number, self.config.policy.timeout_s or 0)
        reports = coordinator.close_evaluation()
        result = FederatedEvaluation.of(reports)
        if reports and not result.clients and not self._told_no_held_out:
            self._told_no_held_out = True
            log.warning(
                "round %d: none of the %d clients asked to evaluate holds held-out data (LocalData.test, "
                "or evaluate= in a script), so federated evaluation measures nothing; give them some, "
                "or turn it off with --eval-every 0", number, len(reports),
            )  # fmt: skip
        return FederatedRecord(
            clients=result.clients,
            num_examples=result.num_examples,
            metrics=result.metrics,
            reports=[ClientReport(r.client_id, r.num_examples, dict(r.metrics)) for r in reports],
        )

    def _save_results(self, job: _Job) -> None:
        job.model.set_weights(job.weights)
        if getattr(job.model, "optimizer", None) is not None:
            job.model.optimizer.build(job.model.trainable_variables)  # saved with fresh slots: loads cleanly
        job.model.save(self.results.model_path)
        self.results.write_history(job.run, self.records, finished=True)
        last = self.records[-1] if self.records else None
        main = main_metric(
            job.loaded.task.main_metric,
            last.central if last else None,
            last.federated.metrics if last and last.federated else None,
        )
        self.results.plot(self.records, main)

    def _monitor(self) -> Monitor:
        if self.monitor is None:
            raise RuntimeError("the monitor is made before the rounds start")
        return self.monitor

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
        coordinator.wait_all_ready(self.config.policy.join_timeout_s)  # those that withdrew excepted
        if coordinator.interrupted or coordinator.ready_clients >= run.num_clients:
            return
        log.info(
            "starting with %d of %d clients ready; the others join from the round after they arrive",
            coordinator.ready_clients, run.num_clients,
        )  # fmt: skip

    def _secure_collect(self, coordinator: RoundCoordinator, secure: SecAggRound, number: int) -> int:
        """Keys, shares, then the masked updates of every client that shared (or those in by the
        round timeout); returns how many were expected. SecAggError: the attempt is aborted."""
        stopping = lambda: coordinator.interrupted  # noqa: E731
        if not secure.run_key_stages(self.config.secagg_timeout_s, stopping):
            raise SecAggError(secure.reason or "stopping")
        expected = len(secure.shared)
        timeout = self.config.policy.timeout_s or MASKED_INPUT_TIMEOUT_S
        if not coordinator.wait_for_updates(expected, timeout) and not coordinator.interrupted:
            log.info(
                "round %d: closing after %.0f s with %d of %d masked updates",
                number,
                timeout,
                coordinator.received,
                expected,
            )
        if coordinator.interrupted:
            secure.abort("the server is stopping")
            raise SecAggError("the server is stopping")
        if coordinator.received == 0:
            secure.abort("no masked update arrived")
            raise SecAggError(secure.reason)
        return expected

    def _secure_aborted(self, number: int, error: SecAggError, aborted: int, culprits: Sequence[int]) -> None:
        blame = (
            f"; client(s) {list(culprits)}, whose secrets could not be rebuilt from the shares they "
            "sent, are left out from now on"
            if culprits
            else ""
        )
        log.error(
            "round %d: secure aggregation aborted (%d in a row): %s%s. The weights stay as they were and "
            "the round is trained again with fresh keys", number, aborted, error, blame,
        )  # fmt: skip
        if aborted >= MAX_ABORTED_ROUNDS:
            raise RunFailedError(
                f"{aborted} attempts in a row at round {number} could not be securely aggregated; stopping. "
                f"The checkpoint after round {number - 1} is intact: check that enough clients stay up for "
                "a whole round (--secagg-threshold, --secagg-timeout), and start the server again to resume"
            )

    def _collect(self, coordinator: RoundCoordinator, expected: int, number: int, minimum: int) -> bool:
        """Wait until the open round may close; False when the server is stopping. RunFailedError:
        withdrawals left fewer clients than --min-clients."""
        timeout = self.config.policy.timeout_s
        if coordinator.wait_for_everyone(timeout):  # with at least --min-clients, or the run failed
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
        # These may change between two starts of one run.
        return replace(
            saved,
            rounds=wanted.rounds,
            compression=wanted.compression,
            evaluation=wanted.evaluation,
            secagg=wanted.secagg,
        )


def _weights_of_saved_model(path: Path, model: Any) -> list[np.ndarray]:
    """The weights of a saved .keras model (loaded in safe mode: no code runs), which must have
    the task model's tensors, in order."""
    import keras

    try:
        saved = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        raise ConfigError(f"--init-model {path} cannot be loaded as a Keras model: {exc}") from None
    weights = [np.asarray(w) for w in saved.get_weights()]
    want = [(tuple(w.shape), w.dtype) for w in model.get_weights()]
    got = [(tuple(w.shape), w.dtype) for w in weights]
    if got != want:
        raise TaskError(
            f"--init-model {path} has {len(got)} tensors {got[:3]}..., but the task's model has "
            f"{len(want)} {want[:3]}...: it is not a saved model of this task"
        )
    log.info("starting from the weights of %s", path)
    return weights


def _described(strategy: Mapping[str, Any], *, secure: bool) -> str:
    """'fedavgm (server_lr 0.1, momentum 0.9)': a strategy record for the log."""
    parameters = ", ".join(f"{k} {v:g}" for k, v in strategy.items() if k != "name")
    return f"{strategy['name']}{f' ({parameters})' if parameters else ''}" + (
        ", under secure aggregation" if secure else ""
    )


def _evaluation_plan(central: bool, run: RunSpec) -> str:
    parts = ["central, on the server's test set"] if central else []
    plan = run.evaluation
    if plan.every:
        share = "all" if plan.fraction >= 1 else f"{plan.fraction:.0%} of the"
        every = "every round" if plan.every == 1 else f"every {plan.every} rounds"
        personal = (
            f", then after {plan.personalize_epochs} epochs of fine-tuning" if plan.personalize_epochs else ""
        )
        parts.append(f"federated, {share} clients {every}{personal}, by those that hold held-out data")
    return "; ".join(parts) or "none"


def _all_finite(weights: Sequence[np.ndarray]) -> bool:
    return all(np.isfinite(w).all() for w in weights if np.issubdtype(np.asarray(w).dtype, np.floating))
