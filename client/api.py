"""Make an existing training script a federated client: a few lines, no class to write.

    import fedgrpc.client as fl

    federation = fl.connect()                          # joins the run (settings below)
    x, y = federation.shard(x, y)                      # stand-in federations only: this site's part
    for round in federation.rounds(model):             # each round the server opens, with its weights set
        model.fit(x, y, epochs=1, batch_size=32)       # your training, unchanged
        round.submit(model, num_examples=len(x))       # the new weights go back

`connect()` takes its settings as arguments or from the environment: FL_SERVER (host:port),
FL_CLIENT_ID, FL_TOKEN, FL_CA (turns on TLS), FL_CERT and FL_KEY (mutual TLS), FL_INSECURE=1
(plain text, trusted networks only), FL_DATA (whatever the script reads). Underneath is the
code `fl-client` runs, the same client session (fedgrpc.client.session): retries with
backoff, long-polls, streamed weights, the run's DP clipping, compression, secure aggregation
(keys shared before the round is handed out; timings only among the metrics sent), TLS and
tokens.

`rounds(model)` sets the global weights into the model and puts its optimizer back to its
just-compiled state at the start of every round (no optimizer state carries over, as in the
reference job). A script that can evaluate passes `evaluate=`, a function of the model that
returns `(num_examples, metrics)` on the script's held-out data; the server asks for it when it
evaluates federated, and a script without it answers that it has no held-out data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..common.config import RunSpec
from ..common.errors import ConfigError, TaskError
from ..common.protocol import Assignment, Instruction
from ..common.settings import require_tls
from ..common.words import plural
from .channel import ChannelSecurity
from .connection import Connection
from .link import BlockingLink
from .session import BlockingSession, Session
from .steps import exchange_steps

__all__ = ["Federation", "Round", "connect"]

log = logging.getLogger("fedgrpc.client")

#: A script's evaluation: the model in, (held-out examples, metrics) out.
Evaluate = Callable[[Any], tuple[int, Mapping[str, float]]]


def connect(
    server: str | None = None,
    client_id: int | None = None,
    *,
    token: str | None = None,
    ca: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    insecure: bool | None = None,
    connect_timeout_s: float = 60.0,
) -> Federation:
    """Join the run at `server` as client `client_id` (each from the environment when not given)."""
    server = server or os.environ.get("FL_SERVER") or "localhost:50051"
    raw_id = client_id if client_id is not None else os.environ.get("FL_CLIENT_ID")
    if raw_id is None:
        raise ConfigError("which client is this? pass client_id= or set FL_CLIENT_ID (1..N)")
    try:
        number = int(raw_id)
    except ValueError:
        raise ConfigError(f"FL_CLIENT_ID must be a whole number, got {raw_id!r}") from None
    ca = ca or os.environ.get("FL_CA") or None
    insecure = insecure if insecure is not None else os.environ.get("FL_INSECURE", "") in ("1", "true", "yes")
    require_tls(
        ca is not None,
        insecure,
        give="pass ca= (or set FL_CA) with the server's CA certificate",
        without="insecure=True (FL_INSECURE=1) to talk",
    )
    if ca is None:
        log.warning("INSECURE: talking to %s without TLS", server)
    security = ChannelSecurity(
        ca=Path(ca) if ca else None,
        cert=Path(cert or os.environ["FL_CERT"]) if (cert or os.environ.get("FL_CERT")) else None,
        key=Path(key or os.environ["FL_KEY"]) if (key or os.environ.get("FL_KEY")) else None,
        token=token or os.environ.get("FL_TOKEN") or None,
    )
    connection = Connection(server, number, connect_timeout_s=connect_timeout_s, security=security)
    try:
        run, _ = connection.join()
    except BaseException:
        connection.close()
        raise
    log.info("joined run %s at %s as client %d: %s", run.run_id, server, number, plural(run.rounds, "round"))
    return Federation(connection, run)


@dataclass
class Round:
    """One round the server opened: its number and global weights, and how to answer it."""

    number: int
    weights: list[np.ndarray]
    _federation: Federation = field(repr=False)
    _assignment: Assignment = field(repr=False)
    submitted: bool = False

    def submit(
        self, model_or_weights: Any, num_examples: int, metrics: Mapping[str, float] | None = None
    ) -> None:
        """Send this round's result: a Keras model (its weights are taken) or a list of arrays,
        and the number of examples it trained on (FedAvg's weight)."""
        weights = (
            model_or_weights.get_weights() if hasattr(model_or_weights, "get_weights") else model_or_weights
        )
        self._federation._submit(self, list(weights), num_examples, dict(metrics or {}))
        self.submitted = True


class Federation:
    """A joined run, from `connect()`."""

    def __init__(self, connection: Connection, run: RunSpec) -> None:
        self.connection = connection
        self.run = run
        self.client_id = connection.client_id
        link = BlockingLink(connection)
        session = Session(link, run, exchange_steps(link, run), server=connection.target)
        self._session = BlockingSession(session)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.connection.close()

    def shard(self, x: Any, y: np.ndarray, *more: Any) -> tuple[Any, ...]:
        """This client's part of one dataset under the run's partitioning: for stand-in
        federations, where every client holds the same dataset (demos, benchmarks)."""
        from ..common.task import Site

        site = Site(
            self.client_id,
            self.run.num_clients,
            None,
            dict(self.run.task_params),
            self.run.batch_size,
            self.run.partition_seed,
            self.run.partition,
        )
        return site.shard(x, y, *more)

    def rounds(self, model: Any = None, *, evaluate: Evaluate | None = None) -> Iterator[Round]:
        """Every round the server opens for this client, until the run is finished. With a model,
        its weights are set (and its optimizer reset) before each round is handed out."""
        prepare = _ModelReset(model, self.run) if model is not None else None
        while (assignment := self._session.next()) is not None:
            if prepare is not None:
                try:
                    prepare.start_from(assignment.weights)
                except TaskError as exc:  # the server would wait for this client: say why it cannot come
                    self.connection.withdraw(str(exc))
                    raise
            if assignment.instruction is Instruction.EVALUATE:
                count, metrics = (0, {}) if evaluate is None or model is None else evaluate(model)
                self._session.report(assignment, int(count), metrics)
                continue
            current = Round(assignment.round, assignment.weights, self, assignment)
            yield current
            if not current.submitted:
                raise TaskError(
                    f"round {assignment.round} ended without round.submit(...): every round the server "
                    "hands out must be answered"
                )
        log.info("run finished after %s", plural(self._session.session.finished_after, "round"))

    def _submit(
        self, current: Round, weights: list[np.ndarray], num_examples: int, metrics: dict[str, float]
    ) -> None:
        answer = self._session.submit(current._assignment, weights, num_examples, metrics)
        if answer is not None:
            log.info("round %d submitted (%d/%d updates in)", current.number, *answer)


class _ModelReset:
    """What `rounds(model)` does to a script's model before each round: the global weights set,
    the optimizer back to its just-compiled state, FedProx's anchors moved to the new weights."""

    def __init__(self, model: Any, run: RunSpec) -> None:
        self.model = model
        self.fresh = self.proximal = None
        if getattr(model, "optimizer", None) is not None:
            from ..common.models import FreshOptimizer

            if run.proximal_mu > 0:  # FedProx: the optimizer pulls toward the global weights
                from .proximal import install

                self.proximal = install(model, run.proximal_mu)
            self.fresh = FreshOptimizer(model)

    def start_from(self, weights: Sequence[np.ndarray]) -> None:
        _set_weights(self.model, weights)
        if self.fresh is not None:
            self.fresh.reset()
        if self.proximal is not None:
            self.proximal.set_anchors()


def _set_weights(model: Any, weights: Sequence[np.ndarray]) -> None:
    try:
        model.set_weights(list(weights))
    except ValueError as exc:
        raise TaskError(
            f"the server's weights do not fit this script's model ({exc}): build the model the "
            "server's task builds"
        ) from None
