"""A whole client run: load the task, join, load this site's data, then train and evaluate
whatever the server asks for until the run is finished."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..common import task_loader
from ..common.codec import DEFAULT_CHUNK_BYTES, TensorSpec
from ..common.config import DEFAULT_TASK, RunSpec
from ..common.errors import ConfigError, FedGrpcError
from ..common.logs import human_bytes
from ..common.models import configure_devices
from ..common.protocol import Instruction
from ..common.task import Params, Site
from ..common.task_loader import LoadedTask, load_task
from ..common.words import plural
from .channel import ChannelSecurity
from .connection import Connection
from .link import BlockingLink
from .session import BlockingSession, Session
from .state import DEFAULT_STATE_DIR, StateStore, site_state_dir
from .steps import LocalDP as LocalDP  # fl-client's settings (cli.py) name it here
from .steps import exchange_steps

if TYPE_CHECKING:
    from .trainer import Evaluation, LocalTrainer, TrainResult

log = logging.getLogger("fedgrpc.client")


@dataclass(frozen=True)
class ClientConfig:
    client_id: int
    server: str
    task: str = DEFAULT_TASK
    data: str | None = None
    connect_timeout_s: float = 60.0
    max_wait_s: float = 30.0
    threads: int | None = None
    progress: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    turn_lock: Path | None = None
    security: ChannelSecurity = field(default_factory=ChannelSecurity)
    local_dp: LocalDP | None = None
    state_dir: str = DEFAULT_STATE_DIR  # the site's state store's root ({id}: the client id)


@contextlib.contextmanager
def training_turn(lock_path: Path | None) -> Iterator[float]:
    """Hold an exclusive lock on lock_path while training; yields the seconds spent waiting.

    Clients that share one machine's CPU can take turns instead of time-slicing it: on a
    2-core machine, 3 clients training one after another at full width finished a round
    1.2x sooner than 3 clients training at once (cache thrash and uneven scheduling).
    """
    if lock_path is None:
        yield 0.0
        return
    started = time.monotonic()
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield time.monotonic() - started
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_client(config: ClientConfig) -> int:
    """Take part in the run until the server says it is finished; returns rounds trained."""
    if config.client_id < 1:
        raise ConfigError(f"client ids start at 1, got {config.client_id}")
    loaded = load_task(config.task)  # a task that does not import fails here, before joining
    with Connection(
        config.server,
        config.client_id,
        connect_timeout_s=config.connect_timeout_s,
        chunk_bytes=config.chunk_bytes,
        security=config.security,
    ) as connection:
        run, current = connection.join(loaded.ref)
        log.info(
            "joined run %s at %s: task %s, %s, %s (round %d open)",
            run.run_id, config.server, loaded.name, plural(run.rounds, "round"),
            plural(run.num_clients, "client"), current,
        )  # fmt: skip
        log.info("devices: %s", configure_devices(loaded.task, config.threads))
        try:
            trainer = prepare_trainer(loaded, run, config)
        except FedGrpcError as exc:  # the server would wait for this client: say why it cannot come
            connection.withdraw(str(exc))
            raise
        return take_part(connection, run, trainer, config, main_metric=loaded.task.main_metric)


def prepare_trainer(loaded: LoadedTask, run: RunSpec, config: ClientConfig) -> LocalTrainer:
    """Load this site's data and build the task's model, checking that the two fit."""
    from .trainer import LocalTrainer

    params = task_loader.check_params(loaded.task, run.task_params)
    site = Site(
        client_id=config.client_id,
        num_clients=run.num_clients,
        data=config.data,
        params=params,
        batch_size=run.batch_size,
        partition_seed=run.partition_seed,
        partition=run.partition,
    )
    started = time.monotonic()
    data = task_loader.load_data(loaded, site)
    model = task_loader.build_model(loaded, params)
    task_loader.check_fits(loaded, model, data.train, "training data", params)
    if data.test is not None:
        task_loader.check_fits(loaded, model, data.test, "test data", params)
    log.info(
        "data: %d examples to train on, %s held out (%.1f s)",
        data.num_examples,
        data.num_test_examples or "none",
        time.monotonic() - started,
    )
    return LocalTrainer(loaded, run, params, data, model)


class Trainer(Protocol):
    """What take_part trains with: a LocalTrainer, or one client id's view of a shared one."""

    specs: list[TensorSpec]

    def train(
        self,
        round_number: int,
        weights: Sequence[np.ndarray],
        *,
        settings: Params | None = None,
        extras: Mapping[str, np.ndarray] | None = None,
        state: StateStore | None = None,
    ) -> TrainResult: ...

    def evaluate(
        self, round_number: int, weights: Sequence[np.ndarray], personalize_epochs: int = 0
    ) -> Evaluation: ...


def take_part(
    connection: Connection,
    run: RunSpec,
    trainer: Trainer,
    config: ClientConfig,
    *,
    turn: Callable[[], AbstractContextManager[float]] | None = None,
    main_metric: str | None = None,
) -> int:
    """Train and evaluate whatever the server asks until the run is finished; returns rounds
    trained. `turn`: held while training or evaluating (default: --take-turns' lock file).
    `main_metric`: the task's, shown first in the log lines (default: accuracy, else loss)."""
    hold = turn or (lambda: training_turn(config.turn_lock))
    link = BlockingLink(connection)
    state = StateStore(site_state_dir(config.state_dir, config.client_id), run.run_id)
    steps = exchange_steps(link, run, local_dp=config.local_dp, max_wait_s=config.max_wait_s, state=state)
    session = BlockingSession(Session(link, run, steps, server=config.server, max_wait_s=config.max_wait_s))
    while (assignment := session.next()) is not None:
        if assignment.instruction is Instruction.EVALUATE:
            with hold():
                evaluation = trainer.evaluate(
                    assignment.round, assignment.weights, run.evaluation.personalize_epochs
                )
            session.report(assignment, evaluation.num_examples, evaluation.metrics)
            log.info(
                "evaluated round %d on %d held-out examples: %s",
                assignment.round, evaluation.num_examples, _short(evaluation.metrics, main_metric),
            )  # fmt: skip
            continue
        with hold() as waited:
            result = trainer.train(
                assignment.round, assignment.weights,
                settings=assignment.settings, extras=assignment.extras, state=state,
            )  # fmt: skip
        if waited > 0.5:
            log.debug("waited %.1f s for a turn on the CPU", waited)
        answer = session.submit(
            assignment, result.weights, result.num_examples, result.metrics, result.extras
        )
        if answer is not None:
            log.info(
                "round %d  %s  %.1f s  down %s  (%d/%d updates in)",
                assignment.round, _short(result.metrics, main_metric), result.metrics["train_seconds"],
                human_bytes(assignment.wire_bytes), *answer,
            )  # fmt: skip
    trained = session.session.trained
    rounds = plural(session.session.finished_after, "round")
    log.info("run finished after %s; trained %d of them", rounds, trained)
    return trained


def _short(metrics: dict[str, float], main_metric: str | None = None) -> str:
    """The metrics a person looks at first, e.g. 'loss 0.8123  macro_f1 0.7011': loss and the
    main metric, and after fine-tuning their personalized_ twins, then others up to four."""
    main = main_metric or ("accuracy" if "accuracy" in metrics else "loss")
    first = [n for n in ("loss", main, "personalized_loss", f"personalized_{main}") if n in metrics]
    rest = [n for n in metrics if n not in first and n != "train_seconds"]
    shown = list(dict.fromkeys(first + rest))[: max(4, len(first))]
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in shown) or "no metrics"
