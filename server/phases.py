"""The round state machine: which round is open, who may train it, when an update still counts.

    waiting --open_round(r)--> training --close_round()--> aggregating --open_round(r+1)--> ...
                                                              |   ^
                                          open_evaluation(r)  v   |  close_evaluation()
                                                            evaluating
    aggregating --finish()--> finished
    any phase --interrupt()--> (same phase, interrupted): waits end, clients are told WAIT

`waiting` is the phase before this server process opens its first round (clients are getting
ready); `aggregating` is between two rounds; in `evaluating`, a sample of the ready clients
evaluates the new global weights on its own held-out data (federated evaluation). An
interrupted server (SIGTERM) never tells its clients that the run is finished: they keep
retrying and carry on with the restarted server.

Who trains a round: every client of its sample (every enrolled one without sampling) that has
not yet sent an update for it, except a late joiner (fedgrpc.server.roster), and under secure
aggregation only while its keys are being advertised. `check_open` is the one check an update
passes: its round is open, its client may train it, and it was not counted before. Under
--mode fedbuff a round is one model version's buffer and fedgrpc.server.buffered decides
instead: who may start (a free slot), which version an update may come from (not too stale),
and what a retry is.

Threads: the gRPC handlers and the driver thread share one lock (`changed`, with a second
condition on it for phase changes only, so that each of 1000 updates wakes the one driver
thread, not every waiting long-poll). Listeners added with `on_wake` are called after every
phase change, interrupt and secure-aggregation stage change (the gRPC side wakes its
long-polls); watchers added with `on_phase` get every phase change as a PhaseChange, the one
place a phase leaves this module (the monitor shows it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from ..common.codec import TensorSpec
from ..common.config import ParamValue, RunSpec
from ..common.errors import StaleRoundError, UpdateRejectedError
from ..common.protocol import Instruction
from .roster import Roster
from .secagg import SecAggRound

if TYPE_CHECKING:
    from .buffered import BufferedRounds
    from .evaluation_round import Evaluation


class Phase(Enum):
    WAITING = "waiting"  # no round opened yet by this server process
    TRAINING = "training"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    FINISHED = "finished"


@dataclass(frozen=True)
class PhaseChange:
    """The phase the server entered, for round `round`; `expected`: on closing a round, the
    clients that were to train it (those that sent nothing are late)."""

    phase: Phase
    round: int
    expected: tuple[int, ...] | None = None


@dataclass(frozen=True)
class RoundAssignment:
    """What the server assigns one client next; `weights` is set for TRAIN and EVALUATE, and a
    TRAIN carries the round's client `settings` and the strategy protocol's `extras`."""

    instruction: Instruction
    round: int
    weights: tuple[np.ndarray, ...] = ()
    settings: Mapping[str, ParamValue] = field(default_factory=dict)
    extras: Sequence[tuple[TensorSpec, np.ndarray]] = ()


@dataclass(frozen=True)
class AcceptedUpdate:
    client_id: int
    num_examples: int
    metrics: Mapping[str, float]
    largest_change: float = 0.0  # largest prepared magnitude (FedAvg: num_examples x change)
    staleness: int | None = None  # --mode fedbuff: versions between its training and its buffer


@dataclass
class OpenRound:
    """One attempt at a round, open or the last one closed."""

    number: int
    weights: tuple[np.ndarray, ...]
    participants: frozenset[int] | None = None  # None: every enrolled client
    secure: SecAggRound | None = None
    accepted: dict[int, AcceptedUpdate] = field(default_factory=dict)
    counted: frozenset[int] | None = None  # once closed: whose updates the aggregate holds
    bytes_in: int = 0
    bytes_out: int = 0
    settings: Mapping[str, ParamValue] = field(default_factory=dict)  # the clients' for this round
    extras: Sequence[tuple[TensorSpec, np.ndarray]] = ()  # the strategy protocol's, sent with TRAIN


class RoundState:
    """The phase, the open round and evaluation, and the roster, under one lock."""

    def __init__(self, run: RunSpec, roster: Roster) -> None:
        self.run = run
        self.roster = roster
        lock = threading.Lock()
        self.changed = threading.Condition(lock)
        self.phase_changed = threading.Condition(lock)
        self._wake: list[Callable[[], None]] = []
        self._watchers: list[Callable[[PhaseChange], None]] = []
        self.phase = Phase.WAITING
        self.round: OpenRound | None = None
        self.evaluation: Evaluation | None = None
        self.last_round = 0
        self.interrupted = False
        self.counted: dict[int, int] = {}  # client -> its last counted update's round, of closed rounds
        self.buffered: BufferedRounds | None = None  # --mode fedbuff: its rules of who trains, what counts

    def on_wake(self, listener: Callable[[], None]) -> None:
        self._wake.append(listener)

    def on_phase(self, watcher: Callable[[PhaseChange], None]) -> None:
        self._watchers.append(watcher)

    # -- transitions (lock held), then `announce` once the lock is released ----------------------

    def enter(self, phase: Phase, round_number: int, expected: tuple[int, ...] | None = None) -> PhaseChange:
        self.phase = phase
        self.notify_everyone()
        return PhaseChange(phase, round_number, expected)

    def notify_everyone(self) -> None:
        self.changed.notify_all()
        self.phase_changed.notify_all()

    def announce(self, change: PhaseChange | None = None) -> None:
        """No lock held: tell the watchers of `change`, then wake the listeners."""
        if change is not None:
            for watcher in self._watchers:
                watcher(change)
        self.wake()

    def wake(self) -> None:
        for listener in self._wake:
            listener()

    # -- questions (lock held) -----------------------------------------------------------------

    def require_round(self) -> OpenRound:
        if self.round is None:
            raise RuntimeError("no round was opened")
        return self.round

    def expected(self, current: OpenRound | None) -> int:
        """Updates `current` waits for: its sample, or every enrolled client, less withdrawals."""
        withdrawn = self.roster.withdrawn
        if current is not None and current.secure is not None and current.secure.shared:
            return len(current.secure.shared)  # the masked updates this attempt waits for
        if current is None or current.participants is None:
            return self.run.num_clients - len(withdrawn)
        return len(current.participants - withdrawn.keys())

    def everyone_in(self, current: OpenRound) -> bool:
        """Every client the round still expects has reported. Under secure aggregation that is
        every client that shared its keys (its masked update is needed, withdrawn or not);
        otherwise only updates of clients that have not withdrawn count toward it."""
        if current.secure is not None and current.secure.shared:
            return len(current.accepted) >= len(current.secure.shared)
        return len(current.accepted.keys() - self.roster.withdrawn.keys()) >= self.expected(current)

    def may_train(self, client_id: int, current: OpenRound) -> bool:
        if self.buffered is not None:  # fedbuff: no late joiners, a free slot instead
            return (
                client_id not in current.accepted
                and (current.participants is None or client_id in current.participants)
                and self.buffered.may_start(client_id)
            )
        return (
            client_id not in current.accepted
            and not self.roster.late_for(client_id, current.number)
            and (current.participants is None or client_id in current.participants)
            and (current.secure is None or current.secure.may_start(client_id))
        )

    def assignment(self, client_id: int, after_round: int) -> RoundAssignment | None:
        """What this client should do now, or None until the phase changes; the client's first
        call marks it ready (`after_round` 0: a new client)."""
        training = self.round.number if self.phase is Phase.TRAINING and self.round is not None else None
        if self.roster.asked(client_id, after_round, training):
            self.changed.notify_all()
        if self.buffered is not None:
            self.buffered.release(client_id)  # a client that asks is not training
        if self.phase is Phase.FINISHED:
            self.roster.told_finished.add(client_id)
            self.changed.notify_all()
            return RoundAssignment(Instruction.FINISHED, self.last_round)
        if self.interrupted:
            return RoundAssignment(Instruction.WAIT, self.last_round)
        current = self.round
        if self.phase is Phase.TRAINING and current is not None and self.may_train(client_id, current):
            if self.buffered is not None:
                self.buffered.started(client_id, current.number)
            return RoundAssignment(
                Instruction.TRAIN, current.number, current.weights, current.settings, current.extras
            )
        evaluation = self.evaluation
        if self.phase is Phase.EVALUATING and evaluation is not None and evaluation.asks(client_id):
            return RoundAssignment(Instruction.EVALUATE, evaluation.number, evaluation.weights)
        return None

    def wait(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """The driver's waits: until `done`, the timeout or an interrupt (False unless done and
        not interrupted). Every withdrawal wakes them: RunFailedError once too few clients are left."""
        self.changed.wait_for(lambda: done() or self.interrupted or self.roster.too_few(), timeout)
        if self.roster.too_few() and not self.interrupted:
            raise self.roster.too_few_error()
        return done() and not self.interrupted

    def check_open(self, client_id: int, round_number: int, session: bytes = b"") -> OpenRound:
        """The one check of an update: round `round_number` is open, its client may train it,
        and no update of its was counted for it (StaleRoundError, UpdateRejectedError)."""
        current = self.round
        if self._counted_before(client_id, round_number, session):
            raise UpdateRejectedError(
                f"client {client_id} already submitted an update for round {round_number}; "
                "it was counted once",
                code="ALREADY_EXISTS",
            )
        if self.phase is Phase.FINISHED:
            raise StaleRoundError(
                f"the run is finished; round {round_number} is closed", current_round=self.last_round
            )
        if self.buffered is not None and current is not None and self.phase is Phase.TRAINING:
            self.buffered.check(client_id, round_number, current)  # fedbuff: any version not too stale
            return current
        if current is None or self.phase is not Phase.TRAINING or round_number != current.number:
            raise self._not_open(round_number)
        if current.participants is not None and client_id not in current.participants:
            raise StaleRoundError(
                f"client {client_id} was not sampled for round {current.number}; "
                "it waits for a round that samples it",
                current_round=current.number,
            )
        if self.roster.late_for(client_id, current.number):
            raise StaleRoundError(
                f"client {client_id} joined while round {current.number} was open; "
                "it takes part from the next round",
                current_round=current.number,
            )
        if current.secure is not None:
            current.secure.may_submit(client_id, session)
        return current

    def _not_open(self, round_number: int) -> StaleRoundError:
        current = self.round
        open_now = current.number if current is not None and self.phase is Phase.TRAINING else None
        if open_now is not None:
            state = str(open_now)
        elif self.phase is Phase.WAITING:
            state = "none yet, the server is waiting for its clients to be ready"
        elif self.phase is Phase.EVALUATING:
            state = f"none, clients are evaluating round {self.last_round}"
        else:
            state = f"none, the server is aggregating round {self.last_round}"
        return StaleRoundError(
            f"round {round_number} is not open (open round: {state}); "
            "fetch the current weights and train again",
            current_round=open_now,
        )

    def _counted_before(self, client_id: int, round_number: int, session: bytes) -> bool:
        """A retry of an update that was counted: in the open or last round's attempt (under
        secure aggregation, masked for that attempt's session), open or closed since (once
        closed, only the updates its aggregate holds), or in a round that completed before."""
        if self.buffered is not None:
            return self.buffered.counted_before(client_id, round_number)
        current = self.round
        if current is not None and current.number == round_number:
            held = current.accepted if current.counted is None else current.counted
            return client_id in held and (current.secure is None or session == current.secure.session)
        return self.counted.get(client_id) == round_number
