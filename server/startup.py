"""Setting a run up, before its first round: the strategy, the task and its model, where the
weights start (the task's model, --init-model, or the checkpoint of a run being resumed), the
round coordinator and the gRPC endpoint the clients reach it by.

Nothing here drives a round (server.driver does) or writes a round's record (the sinks of
server.events do); what is written here is once per run: partition.json for a stand-in
federation's partition.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..common import task_loader
from ..common.config import RunSpec, SecAggSpec
from ..common.errors import ConfigError, TaskError
from ..common.privacy import PrivacyAccountant
from ..common.task import Site
from ..common.task_loader import LoadedTask
from ..common.words import plural
from .auth import Authenticator
from .checkpoint import Checkpoint
from .endpoint import EndpointConfig, GrpcEndpoint
from .evaluation import CentralEvaluator, describe, main_metric
from .monitor import Monitor
from .results import RoundRecord, RunResults
from .revocation import RevocationList
from .round_settings import RoundPlan
from .rounds import RoundCoordinator
from .secure_collect import secure
from .strategy import CentralDP, Strategy, make_strategy

if TYPE_CHECKING:
    from pathlib import Path

    from .config import ServerConfig

log = logging.getLogger("fedgrpc.server")

#: RunSpec fields a resumed run must share with its checkpoint (rounds may be extended).
_RESUME_MUST_MATCH = (
    "num_clients", "partition_seed", "partition", "batch_size", "local_epochs", "task", "task_params",
)  # fmt: skip


@dataclass
class Job:
    """What a run works with once it is set up; `weights` are the global weights as they move on."""

    loaded: LoadedTask
    run: RunSpec
    model: Any
    weights: list[np.ndarray]
    first_round: int
    central: CentralEvaluator | None
    history: list[RoundRecord]  # a resumed run's past rounds, then every round it completes

    @property
    def declared_metric(self) -> str:
        """The task's main metric, "accuracy" when it names none (a resumed run's past rounds)."""
        return self.loaded.task.main_metric or "accuracy"


def make_run_strategy(config: ServerConfig) -> Strategy:
    """The run's aggregation rule: central DP around it, secure aggregation around that."""
    per_round = _updates_per_round(config)
    dp = config.privacy
    central_dp = None if dp is None else CentralDP(dp.clip, dp.noise_multiplier, per_round)
    strategy = make_strategy(config.strategy, central_dp)
    if config.fedbuff is not None and getattr(strategy, "takes_tensors", False):
        raise ConfigError(
            f"--strategy {config.strategy.name} cannot run under --mode fedbuff: its updates carry "
            "tensors of their own, which the buffer does not fold; use --mode sync"
        )
    return secure(config, strategy) if config.secagg is not None else strategy


def _updates_per_round(config: ServerConfig) -> int:
    """What DP's noisy sum is divided by: a round's sample, or under --mode fedbuff the buffer size."""
    if config.fedbuff is not None:
        return config.fedbuff.buffer(config.run.num_clients)
    return config.clients_per_round or config.run.num_clients


def privacy_accountant(config: ServerConfig) -> PrivacyAccountant | None:
    """What each round spends of the privacy budget, under noise; None without DP noise."""
    dp = config.privacy
    if dp is None or not dp.noise_multiplier > 0:
        return None
    per_round = config.clients_per_round or config.run.num_clients
    if config.fedbuff is not None:  # each aggregation holds one update per client at most: no
        per_round = config.run.num_clients  # amplification by sampling is claimed, each one counts
    sampling = "all" if per_round >= config.run.num_clients else config.client_sampling
    return PrivacyAccountant(dp.noise_multiplier, dp.delta, sampling, config.run.num_clients, per_round)


def round_minimum(config: ServerConfig) -> int:
    """The fewest updates a round may close with (--min-clients), checked against the strategy."""
    minimum = config.policy.minimum(config.run)
    byzantine = config.strategy.byzantine
    if config.strategy.name == "krum" and minimum <= byzantine + 2:
        raise ConfigError(
            f"krum with --byzantine {byzantine} needs rounds of more than {byzantine + 2} updates; "
            f"raise --min-clients (now {minimum}) or lower --byzantine"
        )
    return minimum


def load_job(config: ServerConfig, checkpoint: Checkpoint | None, results: RunResults) -> Job:
    """The task, its model and central test set, and the weights to start from."""
    loaded = task_loader.load_task(config.task)
    params = task_loader.resolve_params(loaded.task, config.task_params)
    log.info("task %s from %s (digest %s)", loaded.name, loaded.source, loaded.ref.digest[:12])
    from ..common.models import configure_devices, seed_everything

    log.info("devices: %s", configure_devices(loaded.task, config.threads))
    seed_everything(loaded.task, config.init_seed)
    model = task_loader.build_model(loaded, params)
    site = Site(
        client_id=0,
        num_clients=config.run.num_clients,
        data=config.data,
        params=params,
        batch_size=config.run.batch_size,
        partition_seed=config.run.partition_seed,
        partition=config.run.partition,
    )
    central = _central_evaluator(config, loaded, model, site)
    if loaded.task.partition_labels is not None and checkpoint is None:
        _write_partition(config, loaded, site, results)
    run = _run_spec(config, loaded, params, central is not None)
    weights = task_loader.get_weights(loaded, model)
    if config.init_model:
        weights = weights_of_saved_model(config.init_model, weights)
    job = Job(loaded, run, model, weights, 1, central, [])
    if checkpoint is not None:
        _resume(job, checkpoint)
    log.info(
        "model: %d tensors, %d parameters; evaluation: %s",
        len(job.weights),
        sum(int(np.size(w)) for w in job.weights),
        evaluation_plan(central is not None, job.run),
    )
    if central is not None and job.first_round == 1:
        # While the clients start: the baseline, and the evaluation compiled for every batch
        # shape it will see, so that round 1 does not pay for it (on JAX, seconds).
        started = time.monotonic()
        initial = central(0, job.weights)
        main = main_metric(loaded.task.main_metric, initial)
        log.info("initial model: %s (%.1f s)", describe(main, initial, None), time.monotonic() - started)
    return job


def _central_evaluator(
    config: ServerConfig, loaded: LoadedTask, model: Any, site: Site
) -> CentralEvaluator | None:
    """The server's own evaluation, when the task gives it a test set."""
    started = time.monotonic()
    test = task_loader.load_test_data(loaded, site)
    if test is None:
        return None
    task_loader.check_fits(loaded, model, test, "test set", site.params)
    central = CentralEvaluator(loaded, model, test, site.params, config.run.batch_size)
    log.info(
        "central test set from %s loaded (%.1f s)", config.data or "the task", time.monotonic() - started
    )
    return central


def _write_partition(config: ServerConfig, loaded: LoadedTask, site: Site, results: RunResults) -> None:
    """partition.json and its figure: what each client of a stand-in federation trains on."""
    assert loaded.task.partition_labels is not None  # only a task that names its labels is asked
    labels = task_loader.call(loaded, "partition_labels", loaded.task.partition_labels, site)
    summary = results.write_partition(config.run, np.asarray(labels))
    sizes = [c["examples"] for c in summary["clients"]]
    log.info(
        "partition %s: %d to %d examples a client (%s)",
        config.run.partition, min(sizes), max(sizes), results.out_dir / "partition.json",
    )  # fmt: skip


def _run_spec(config: ServerConfig, loaded: LoadedTask, params: Any, has_central: bool) -> RunSpec:
    """The spec every client gets: the task resolved, the evaluation plan settled."""
    federated = config.federated_eval
    if federated is None:  # fedbuff: only when asked (its clients evaluating would pause the versions)
        federated = not has_central and config.fedbuff is None
    evaluation = config.run.evaluation
    if federated and evaluation.every == 0:
        evaluation = replace(evaluation, every=1)
    elif not federated:
        evaluation = replace(evaluation, every=0)
    dp = config.privacy
    return replace(
        config.run,
        task=loaded.ref,
        task_params=params,
        evaluation=evaluation,
        proximal_mu=config.strategy.client_proximal_mu,
        dp_clip=dp.clip if dp is not None and dp.clip_on == "client" else 0.0,
        secagg=secagg_spec(config),
        dp_noise_multiplier=dp.noise_multiplier if dp is not None else 0.0,
    )


def _resume(job: Job, checkpoint: Checkpoint) -> None:
    job.run = resumable(job.run, checkpoint.run)
    job.weights, job.history, job.first_round = (
        checkpoint.weights,
        list(checkpoint.history),
        checkpoint.round + 1,
    )
    log.info(
        "resuming run %s after round %d (weights %s)",
        job.run.run_id,
        checkpoint.round,
        checkpoint.digest[:12],
    )


def secagg_spec(config: ServerConfig) -> SecAggSpec | None:
    """The run's encoding: under DP every client weighs 1 and clips to dp_clip (L2, so every
    coordinate too): the ring then needs no more range than that."""
    spec, dp = config.secagg, config.privacy
    if spec is None or dp is None:
        return spec
    return replace(spec, bound=dp.clip, max_examples=1)


def resumable(wanted: RunSpec, saved: RunSpec) -> RunSpec:
    """The spec a resumed run goes on with; ConfigError when it is of another run."""
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


def weights_of_saved_model(path: Path, initial: list[np.ndarray]) -> list[np.ndarray]:
    """The weights of a saved .keras model (loaded in safe mode: no code runs), or of an .npz of
    arrays (a framework-free task's final_weights.npz), which must have the tensors of the task's
    model (`initial`), in order."""
    if path.suffix == ".npz":
        from ..common.models import load_weights

        weights = load_weights(path)
    else:
        import keras

        try:
            saved = keras.models.load_model(path, compile=False, safe_mode=True)
        except Exception as exc:
            raise ConfigError(f"--init-model {path} cannot be loaded as a Keras model: {exc}") from None
        weights = [np.asarray(w) for w in saved.get_weights()]
    want = [(tuple(w.shape), w.dtype) for w in initial]
    got = [(tuple(w.shape), w.dtype) for w in weights]
    if got != want:
        raise TaskError(
            f"--init-model {path} has {len(got)} tensors {got[:3]}..., but the task's model has "
            f"{len(want)} {want[:3]}...: it is not a saved model of this task"
        )
    log.info("starting from the weights of %s", path)
    return weights


def evaluation_plan(central: bool, run: RunSpec) -> str:
    """'central, on the server's test set; federated, all clients every round, ...' for the log."""
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


def make_coordinator(
    config: ServerConfig, job: Job, strategy: Strategy, minimum: int, results: RunResults
) -> RoundCoordinator:
    """The round state machine for this run; with --record-updates, every accepted update saved."""
    specs = task_loader.weight_specs(job.loaded, job.model)
    recorder = None
    if config.record_updates:

        def recorder(round_number: int, client_id: int, arrays: object) -> None:
            results.record_update(round_number, client_id, specs, arrays)  # type: ignore[arg-type]

    coordinator = RoundCoordinator(
        job.run,
        specs,
        strategy,
        max_examples=config.max_examples,
        recorder=recorder,
        clients_per_round=config.clients_per_round,
        sample_seed=config.sample_seed,
        sampling=config.client_sampling,
        secagg_timeout_s=config.secagg_timeout_s,
        min_clients=minimum,
        fedbuff=config.fedbuff,
        slot_timeout_s=config.policy.timeout_s,
        plan=RoundPlan(config.round_schedule, strategy, job.run.task_params),
    )
    results.withdrawals = lambda: coordinator.withdrawals
    return coordinator


def start_endpoint(config: ServerConfig, coordinator: RoundCoordinator, monitor: Monitor) -> GrpcEndpoint:
    """The gRPC service, listening and serving; says how it is secured and where it listens."""
    run = coordinator.run
    mutual_tls = config.tls is not None and config.tls.client_ca is not None
    revoked = RevocationList(config.revoked) if config.revoked else None  # fedgrpc.server.revocation
    endpoint = GrpcEndpoint(
        coordinator,
        EndpointConfig(
            host=config.host,
            port=config.port,
            tls=config.tls,
            authenticator=Authenticator(config.tokens, mutual_tls=mutual_tls, revoked=revoked),
            limits=config.limits,
            chunk_bytes=config.chunk_bytes,
            max_inflight_bytes=config.max_inflight_bytes,
            spool_dir=config.spool_dir,
            health_port=config.health_port,
        ),
        monitor=monitor,
    )
    port = endpoint.start()
    if config.tls is not None:
        what = "mutual TLS" if mutual_tls else "TLS"
        identity = "tokens" if config.tokens else "certificates" if mutual_tls else "nothing"
        log.info("%s on, client identity from %s", what, identity)
    else:
        log.warning(
            "INSECURE: no TLS%s; use this only on a network you trust",
            "" if config.tokens else ", no client tokens",
        )
    endpoint.set_serving(True)
    log.info(
        "run %s: %s, %s, listening on port %d",
        run.run_id, plural(run.rounds, "round"), plural(run.num_clients, "client"), port,
    )  # fmt: skip
    if config.spool_dir is not None:
        log.info("updates being received are staged on disk in %s", config.spool_dir)
    return endpoint
