"""RoundCoordinator: the one object the driver and the gRPC handlers share, made of small parts.

    part                               job
    phases.RoundState                  the state machine (its diagram there), the one update check
    roster.Roster                      who is ready, withdrawn, late
    sampling.ClientSampler             who trains a round, who evaluates it
    training.TrainingRounds            opening an attempt at a round, closing it into a RoundOutcome
    round_mode.ClearRounds/SecureRounds  in the clear or under secure aggregation: open, fold, close
    buffered.BufferedRounds            --mode fedbuff: a model version's buffer in place of a round
    update_admission.UpdateAdmission   an update admitted from its header, then committed
    fold_thread.FoldThread             accepted updates folded into the strategy off the handlers
    evaluation_round.FederatedEvaluations  federated evaluation's sample and reports

Threads: the gRPC handlers (one event loop thread) call poll_task/admit/submit_evaluation,
the server's driver thread opens and closes rounds; every method takes the round state's lock
briefly and none blocks, except the driver's waits and the blocking `next_task`. An accepted
update is counted at once and folded on the fold thread: the client's reply does not wait for
the arithmetic, and close_round waits for the folds before it asks for the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..common.codec import TensorSpec
from ..common.config import RunSpec
from ..common.errors import StaleRoundError
from ..common.protocol import Instruction
from . import pacing
from .buffered import BufferedRounds
from .evaluation_round import EvaluationReport, FederatedEvaluations
from .fold_thread import FoldThread
from .masked_sum import SecAggStrategy
from .phases import AcceptedUpdate, Phase, PhaseChange, RoundAssignment, RoundState
from .roster import Roster
from .round_mode import ClearRounds, RoundMode, SecureRounds
from .round_settings import RoundPlan
from .sampling import ClientSampler
from .secagg import SecAggRound
from .strategy import Strategy
from .training import RoundOutcome, TrainingRounds
from .update_admission import AdmittedUpdate, UpdateAdmission, UpdateHeader, UpdateRecorder

if TYPE_CHECKING:
    from .config import FedBuffSettings

__all__ = [
    "AcceptedUpdate", "AdmittedUpdate", "EvaluationReport", "Phase", "PhaseChange", "RoundAssignment",
    "RoundCoordinator", "RoundOutcome", "UpdateHeader",
]  # fmt: skip


class RoundCoordinator:
    """Owns the global weights between rounds and the bookkeeping of the open round."""

    def __init__(
        self,
        run: RunSpec,
        specs: Sequence[TensorSpec],
        strategy: Strategy,
        *,
        max_examples: int = 10_000_000,
        recorder: UpdateRecorder | None = None,
        clients_per_round: int | None = None,
        sample_seed: int = 0,
        sampling: str = "fixed",
        secagg_timeout_s: float = 60.0,
        min_clients: int = 1,
        fedbuff: FedBuffSettings | None = None,
        slot_timeout_s: float | None = None,
        plan: RoundPlan | None = None,
    ) -> None:
        """`fedbuff`: --mode fedbuff (fedgrpc.server.buffered), a slot held longer than
        `slot_timeout_s` (--round-timeout) is free again. `plan`: each round's client settings
        and strategy extras (default: the strategy's own)."""
        self.sampler = ClientSampler(run.num_clients, clients_per_round, sampling, sample_seed)
        self._away_s: Callable[[], float] = lambda: 0.0
        self.run = run
        self.specs = tuple(specs)
        self._state = RoundState(run, Roster(run.num_clients, min_clients))
        self.mode = _mode(run, self.specs, strategy, secagg_timeout_s)
        if fedbuff is not None:
            if isinstance(self.mode, SecureRounds):
                raise ValueError("--mode fedbuff cannot run under secure aggregation")
            self.mode = BufferedRounds(
                strategy, self.specs, fedbuff, run.num_clients, slot_timeout_s=slot_timeout_s
            )
            self._state.buffered = self.mode
        if isinstance(self.mode, SecureRounds):
            self.mode.tell(self._state.wake, sample_seed)
        self.update_specs = self.mode.update_specs  # what an update lists
        self._folder = FoldThread()
        self._admission = UpdateAdmission(
            self._state, self.mode, self._folder, max_examples=max_examples, recorder=recorder
        )
        self._evaluations = FederatedEvaluations(self._state, self.sampler, max_examples)
        self._training = TrainingRounds(self._state, self.sampler, self.mode, self._folder, plan)

    def on_phase_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` (from whichever thread made the change, no lock held) after every
        phase change, interrupt and secure-aggregation stage change; it must not block."""
        self._state.on_wake(listener)

    def watch_phase(self, watcher: Callable[[PhaseChange], None]) -> None:
        """Call `watcher` with every phase change (no lock held; it must not block)."""
        self._state.on_phase(watcher)

    # -- driver side ---------------------------------------------------------------

    def open_round(self, number: int, weights: Sequence[np.ndarray]) -> None:
        self._training.open(number, weights)

    def close_round(self, *, allow_empty: bool = False) -> RoundOutcome:
        """Stop taking updates and aggregate them. `allow_empty`: a round with none is still
        aggregated (DP with Poisson sampling: its global weights move by noise alone)."""
        return self._training.close(allow_empty=allow_empty)

    def leave_out(self, clients: Sequence[int]) -> None:
        """Keep these clients out of every later secure aggregation of the run."""
        with self._state.changed:
            self._state.roster.left_out.update(clients)

    @property
    def secure_round(self) -> SecAggRound | None:
        """The open (or last) round's secure aggregation, if the run has it."""
        with self._state.changed:
            current = self._state.round
            return current.secure if current is not None else None

    def secure_round_of(self, number: int) -> SecAggRound:
        """Round `number`'s secure aggregation, for a client's step (StaleRoundError if that round
        is not the open or last one)."""
        with self._state.changed:
            current = self._state.round
            if current is None or current.number != number or current.secure is None:
                raise StaleRoundError(
                    f"round {number} has no secure aggregation under way (open round: "
                    f"{current.number if current else 'none'}); ask for the next instruction"
                )
            return current.secure

    def participants(self, number: int) -> list[int]:
        """Who was to train round `number` (the open or last round): its sample, or every client."""
        return self._training.participants(number)

    @property
    def expected(self) -> int:
        """Updates the open round waits for: its sample, or every enrolled client."""
        with self._state.changed:
            return self._state.expected(self._state.round)

    def wait_ready(self, count: int, timeout: float | None = None) -> bool:
        """Block until `count` clients are ready to train (have asked for their first task);
        False on timeout or interrupt, RunFailedError once withdrawals leave too few clients."""
        state = self._state
        with state.changed:
            return state.wait(lambda: len(state.roster.ready) >= count, timeout)

    def wait_all_ready(self, timeout: float | None = None) -> bool:
        """Block until every enrolled client is ready or has withdrawn; False on timeout or interrupt."""
        state, everyone = self._state, self.run.num_clients
        with state.changed:
            return state.wait(
                lambda: len(state.roster.ready) + len(state.roster.withdrawn) >= everyone, timeout
            )

    def wait_for_everyone(self, timeout: float | None = None) -> bool:
        """Block until every client the open round still expects has sent its update (one that
        withdraws meanwhile is no longer expected, and an update it sent before does not stand in
        for another client's); False on timeout or interrupt."""
        state = self._state
        with state.changed:
            current = state.require_round()
            return state.wait(lambda: state.everyone_in(current), timeout)

    def wait_for_updates(self, count: int, timeout: float | None = None) -> bool:
        """Block until the open round holds `count` accepted updates, or every client it still
        expects has reported (no more will come); False on timeout or interrupt."""
        state = self._state
        with state.changed:
            current = state.require_round()
            return state.wait(lambda: len(current.accepted) >= count or state.everyone_in(current), timeout)

    def open_evaluation(self, number: int, weights: Sequence[np.ndarray], fraction: float = 1.0) -> int:
        return self._evaluations.open(number, weights, fraction)

    def wait_for_evaluations(self, count: int, timeout: float | None = None) -> bool:
        return self._evaluations.wait(count, timeout)

    def close_evaluation(self) -> list[EvaluationReport]:
        return self._evaluations.close()

    def finish(self) -> None:
        """The run is over: every client that asks from now on is told FINISHED."""
        state = self._state
        with state.changed:
            change = state.enter(Phase.FINISHED, state.last_round)
        state.announce(change)

    def interrupt(self) -> None:
        """The server is stopping: every wait returns now, clients are told WAIT, not FINISHED."""
        with self._state.changed:
            self._state.interrupted = True
            self._state.notify_everyone()
        self._state.announce()

    @property
    def interrupted(self) -> bool:
        return self._state.interrupted

    # -- handler side --------------------------------------------------------------

    @property
    def current_round(self) -> int:
        return self._state.last_round

    @property
    def phase(self) -> Phase:
        return self._state.phase

    @property
    def finished(self) -> bool:
        return self._state.phase is Phase.FINISHED

    @property
    def ready_clients(self) -> int:
        return len(self._state.roster.ready)

    @property
    def fold_queue_depth(self) -> int:
        return self._folder.depth

    @property
    def global_weights(self) -> tuple[np.ndarray, ...]:
        """The weights the open (or last) round started from; read-only arrays."""
        with self._state.changed:
            return self._state.require_round().weights

    @property
    def received(self) -> int:
        with self._state.changed:
            current = self._state.round
            return len(current.accepted) if current is not None else 0

    def accepted_updates(self) -> list[AcceptedUpdate]:
        """The open (or last) round's accepted updates, by client id."""
        with self._state.changed:
            current = self._state.round
            return [] if current is None else sorted(current.accepted.values(), key=lambda u: u.client_id)

    def poll_task(self, client_id: int, after_round: int) -> RoundAssignment | None:
        """What this client should do now, or None when it should wait for a phase change.

        `after_round` is the last round the client finished (0 for a new client): the first
        call marks the client ready. Never blocks; answers WAIT once the server is stopping.
        """
        self.check_client(client_id)
        with self._state.changed:
            return self._state.assignment(client_id, after_round)

    def needs(self, client_id: int) -> bool:
        """Whether this client may get work before the phase changes: it trains the open round
        and its update is not in, or every client trains every round (fedgrpc.server.pacing)."""
        per_round = self.sampler.clients_per_round
        if per_round is None or per_round >= self.run.num_clients:
            return True
        with self._state.changed:
            return pacing.needed(self._state, client_id)

    def next_task(self, client_id: int, after_round: int, timeout: float) -> RoundAssignment:
        """poll_task, waiting up to `timeout` seconds for something to do (WAIT when nothing came)."""
        deadline = time.monotonic() + timeout
        while True:
            assignment = self.poll_task(client_id, after_round)
            if assignment is not None:
                return assignment
            with self._state.changed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return RoundAssignment(Instruction.WAIT, self._state.last_round)
                self._state.phase_changed.wait(remaining)

    def wait_told_finished(self, client_ids: Sequence[int], timeout: float) -> bool:
        """After finish(): wait until these clients have been told, so none is left hanging; at
        least until the clients told to come back later are due (`on_pacing`)."""
        state, timeout = self._state, max(timeout, self._away_s())
        with state.changed:
            return state.changed.wait_for(lambda: state.roster.told_finished.issuperset(client_ids), timeout)

    def on_pacing(self, away_s: Callable[[], float]) -> None:
        """`away_s()`: seconds until every client told to come back later is due back
        (fedgrpc.server.pacing), so that the end of the run waits for them to hear it."""
        self._away_s = away_s

    def check_client(self, client_id: int) -> None:
        self.run.check_client_id(client_id)

    def withdraw(self, client_id: int, reason: str) -> bool:
        """The client cannot take part (`reason`, already checked): the first round and every
        round stop waiting for it until it asks for a task again. False if it had withdrawn
        already (its reason is updated, but a client that repeats itself is not news)."""
        self.check_client(client_id)
        with self._state.changed:
            new = self._state.roster.withdraw(client_id, reason)
            if self._state.buffered is not None:
                self._state.buffered.release(client_id)
            self._state.changed.notify_all()
        return new

    @property
    def withdrawals(self) -> dict[int, str]:
        """Every client that withdrew during the run, and its last reason."""
        with self._state.changed:
            return dict(sorted(self._state.roster.withdrawals.items()))

    def admit(self, header: UpdateHeader) -> AdmittedUpdate:
        """The one check of an update, from its header (fedgrpc.server.update_admission)."""
        return self._admission.admit(header)

    def submit(
        self,
        client_id: int,
        round_number: int,
        num_examples: int,
        metrics: Mapping[str, float],
        update: Sequence[np.ndarray],
        wire_bytes: int,
        *,
        session: bytes = b"",
    ) -> tuple[int, int]:
        """An update handed over whole (in process): admitted, checked, counted; returns
        (updates received, updates expected)."""
        header = UpdateHeader(client_id, round_number, num_examples, metrics=metrics, session=session)
        return self._admission.submit(header, update, wire_bytes)

    def submit_evaluation(
        self, client_id: int, round_number: int, num_examples: int, metrics: Mapping[str, float]
    ) -> tuple[int, int]:
        """Record one client's evaluation report; returns (reports received, reports expected)."""
        return self._evaluations.submit(client_id, round_number, num_examples, metrics)

    def count_bytes_out(self, round_number: int, nbytes: int) -> None:
        with self._state.changed:
            current = self._state.round
            if current is not None and current.number == round_number:
                current.bytes_out += nbytes


def _mode(run: RunSpec, specs: tuple[TensorSpec, ...], strategy: Strategy, timeout_s: float) -> RoundMode:
    if (run.secagg is not None) != isinstance(strategy, SecAggStrategy):
        raise ValueError("a run with secure aggregation needs a SecAggStrategy, and only such a run")
    if isinstance(strategy, SecAggStrategy):
        return SecureRounds(strategy, run, specs, timeout_s)
    return ClearRounds(strategy, specs)
