"""A whole client run: join, load the shard, then train whatever rounds the server opens."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedgrpc.client.connection import ChannelSecurity, Connection
from fedgrpc.common import device
from fedgrpc.common.codec import DEFAULT_CHUNK_BYTES
from fedgrpc.common.data import describe, load_split
from fedgrpc.common.errors import ConfigError, RunChangedError, StaleRoundError, UpdateRejectedError
from fedgrpc.common.logs import human_bytes
from fedgrpc.common.partition import shard_indices
from fedgrpc.common.protocol import Instruction

log = logging.getLogger("fedgrpc.client")


@dataclass(frozen=True)
class ClientConfig:
    client_id: int
    server: str
    data: str | None = None
    whole_dataset: bool = False
    connect_timeout_s: float = 60.0
    max_wait_s: float = 30.0
    threads: int | None = None
    progress: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    turn_lock: Path | None = None
    security: ChannelSecurity = field(default_factory=ChannelSecurity)


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
    with Connection(
        config.server,
        config.client_id,
        connect_timeout_s=config.connect_timeout_s,
        chunk_bytes=config.chunk_bytes,
        security=config.security,
    ) as connection:
        run, current = connection.join()
        log.info(
            "joined run %s at %s: %d rounds, %d clients, model %s (round %d open)",
            run.run_id, config.server, run.rounds, run.num_clients, run.model, current,
        )  # fmt: skip
        log.info("devices: %s", device.configure(config.threads))
        from fedgrpc.client.trainer import LocalTrainer

        started = time.monotonic()
        examples = load_split(config.data, "train")
        if not config.whole_dataset:
            shard = config.client_id - 1
            examples = examples.subset(
                shard_indices(len(examples), run.num_clients, shard, run.partition_seed)
            )
            where = f"shard {shard + 1}/{run.num_clients} of {describe(config.data)}"
        else:
            where = f"all of {describe(config.data)}"
        log.info("data: %d examples, %s (%.1f s)", len(examples), where, time.monotonic() - started)
        trainer = LocalTrainer(run, examples, progress=config.progress)

        last_round, trained = 0, 0
        while True:
            task = connection.next_task(last_round, config.max_wait_s)
            if task.run_id and task.run_id != run.run_id:
                raise RunChangedError(
                    f"the server at {config.server} now runs {task.run_id}, not the run {run.run_id} this "
                    "client joined (it was replaced, not resumed); start the client again to join the new run"
                )
            if task.instruction is Instruction.FINISHED:
                log.info("run finished after %d rounds; trained %d of them", task.round, trained)
                return trained
            if task.instruction is Instruction.WAIT:
                continue
            with training_turn(config.turn_lock) as waited:
                result = trainer.train(task.weights)
            if waited > 0.5:
                log.debug("waited %.1f s for a turn on the CPU", waited)
            try:
                received, expected = connection.submit(
                    task.round,
                    trainer.specs,
                    result.weights,
                    result.num_examples,
                    result.metrics,
                    method=run.compression,
                    reference=task.weights,
                )
            except StaleRoundError as exc:
                log.warning("round %d closed before this update arrived: %s", task.round, exc)
                last_round = task.round
                continue
            except UpdateRejectedError as exc:
                if exc.code != "ALREADY_EXISTS":  # a retried submit whose first try got through
                    raise
                received, expected = 0, run.num_clients
            last_round, trained = task.round, trained + 1
            log.info(
                "round %d  loss %.4f  acc %.4f  %.1f s  down %s  (%d/%d updates in)",
                task.round, result.metrics.get("loss", float("nan")),
                result.metrics.get("accuracy", float("nan")), result.metrics["train_seconds"],
                human_bytes(task.wire_bytes), received, expected,
            )  # fmt: skip
