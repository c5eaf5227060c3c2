"""The round state machine: which round is open, who has reported, when it may close.

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

Who trains a round: every enrolled client that has not yet sent an update for it, except a
client that first appeared (with no earlier round behind it) while the round was already
open: such a late joiner takes part from the next round. With `clients_per_round` K, each
round trains a seeded sample of K of the clients ready when it opens (cross-device style);
the others wait for a later round. A client that comes back after a restart of either side
says which round it last finished, is not late, and simply gets the open round if its update
for it is not in.

Threads: the gRPC handlers (one event loop thread) call poll_task/check_header/submit, the
server's driver thread opens and closes rounds; every method takes one lock briefly and none
blocks, except the driver's waits and the blocking `next_task`. Listeners added with
`on_phase_change` are called after every phase change (the gRPC side wakes its long-polls
with it). An accepted update is counted at once and folded into the strategy on one
background thread (`_Folder`): the client's reply does not wait for the arithmetic, and
close_round waits for the folds to finish before it asks the strategy for the result.

Under secure aggregation (RunSpec.secagg) each attempt at a round has a SecAggRound
(fedgrpc.server.secagg): TRAIN goes only to its participants while keys are being advertised,
only clients that shared their keys may submit, and close_round unmasks before the result.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import partial

import numpy as np
from fedgrpc.common.codec import TensorSpec
from fedgrpc.common.config import RunSpec, check_clients_per_round
from fedgrpc.common.errors import (
    MetricsError,
    RunFailedError,
    SecAggError,
    StaleRoundError,
    UpdateRejectedError,
)
from fedgrpc.common.metrics import check_metrics
from fedgrpc.common.protocol import Instruction
from fedgrpc.common.secagg import COUNT_TENSOR
from fedgrpc.server.masked_sum import SecAggStrategy
from fedgrpc.server.secagg import SecAggRound
from fedgrpc.server.strategy import Strategy, UpdatePreparer, add_update
from fedgrpc.server.validation import check_arrays, check_num_examples, check_specs


class Phase(Enum):
    WAITING = "waiting"  # no round opened yet by this server process
    TRAINING = "training"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    FINISHED = "finished"


@dataclass(frozen=True)
class Task:
    """What a client should do next; `weights` is set when the instruction is TRAIN."""

    instruction: Instruction
    round: int
    weights: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class AcceptedUpdate:
    client_id: int
    num_examples: int
    metrics: Mapping[str, float]
    largest_change: float = 0.0  # largest prepared magnitude (FedAvg: num_examples x change)


@dataclass(frozen=True)
class EvaluationReport:
    """One client's metrics of the global model on its held-out data (num_examples 0: it has none)."""

    client_id: int
    num_examples: int
    metrics: Mapping[str, float]


@dataclass
class _Evaluation:
    number: int
    weights: tuple[np.ndarray, ...]
    participants: frozenset[int]
    reports: dict[int, EvaluationReport] = field(default_factory=dict)


@dataclass
class RoundOutcome:
    """A closed round: the new global weights and who made them."""

    round: int
    weights: list[np.ndarray]
    updates: list[AcceptedUpdate]
    bytes_in: int
    bytes_out: int


UpdateRecorder = Callable[[int, int, Sequence[np.ndarray]], None]
log = logging.getLogger(__name__)
#: Under secure aggregation, the only metrics an update may carry: names ending in this.
TIMING_SUFFIX = "_seconds"


class _Folder:
    """Runs folds one after another on a daemon thread, in the order they were accepted."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def put(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="fedgrpc-fold", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    @property
    def depth(self) -> int:
        """Folds queued or running."""
        return self._jobs.unfinished_tasks

    def drain(self) -> None:
        """Wait until every fold put so far is done; re-raise the first one that failed."""
        self._jobs.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"folding an accepted update failed: {error}") from error

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except BaseException as exc:  # kept for drain(): a fold must never fail silently
                log.exception("folding an accepted update failed")
                self._error = self._error or exc
            finally:
                del job  # the fold holds an update's arrays: let them go now, not at the next job
                self._jobs.task_done()


@dataclass
class _Round:
    number: int
    weights: tuple[np.ndarray, ...]
    participants: frozenset[int] | None = None  # None: every enrolled client
    secure: SecAggRound | None = None
    accepted: dict[int, AcceptedUpdate] = field(default_factory=dict)
    counted: frozenset[int] | None = None  # once closed: whose updates the aggregate holds
    bytes_in: int = 0
    bytes_out: int = 0


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
    ) -> None:
        check_clients_per_round(clients_per_round, run.num_clients)
        if not 1 <= min_clients <= run.num_clients:
            raise ValueError(f"min_clients must be in 1..{run.num_clients}, got {min_clients}")
        self.run = run
        #: --min-clients: fewer clients left than this once some withdrew, and the run cannot go on.
        self.min_clients = min_clients
        if sampling not in ("fixed", "poisson"):
            raise ValueError(f"sampling must be fixed or poisson, got {sampling!r}")
        self.clients_per_round = clients_per_round
        self.sampling = sampling
        self._sample_seed = sample_seed
        self.specs = tuple(specs)
        # What an update lists: the model's tensors, and under secure aggregation its masked count.
        self.update_specs = self.specs + ((TensorSpec(COUNT_TENSOR, "uint32", (1,)),) if run.secagg else ())
        self.secagg_timeout_s = secagg_timeout_s
        if (run.secagg is not None) != isinstance(strategy, SecAggStrategy):
            raise ValueError("a run with secure aggregation needs a SecAggStrategy, and only such a run")
        self._strategy = strategy
        self._folder = _Folder()
        self._max_examples = max_examples
        self._recorder = recorder
        # Two conditions on one lock: the driver waits for progress (clients ready, updates
        # in), blocking long-polls wait for phase changes only, so that each of 1000 updates
        # wakes the one driver thread, not every waiting call.
        lock = threading.Lock()
        self._changed = threading.Condition(lock)
        self._phase_changed = threading.Condition(lock)
        self._listeners: list[Callable[[], None]] = []
        self._phase = Phase.WAITING
        self._round: _Round | None = None
        self._evaluation: _Evaluation | None = None
        self._last_round = 0
        self._interrupted = False
        self._ready: set[int] = set()
        self._joined_during: dict[int, int] = {}  # late joiner -> the round it must sit out
        self._told_finished: set[int] = set()
        self._left_out: set[int] = set()  # secure aggregation: clients whose shares did not fit
        self._withdrawn: dict[int, str] = {}  # client -> why it cannot take part (until it asks again)
        self._withdrawals: dict[int, str] = {}  # every client that withdrew during the run, last reason
        self._counted: dict[int, int] = {}  # client -> its last counted update's round, of closed rounds

    def on_phase_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` (from whichever thread made the change, no lock held) after every
        phase change and interrupt; it must not block."""
        self._listeners.append(listener)

    # -- driver side ---------------------------------------------------------------

    def open_round(self, number: int, weights: Sequence[np.ndarray]) -> None:
        with self._changed:
            if self._phase is Phase.FINISHED:
                raise RuntimeError("the run is finished")
            frozen = tuple(np.asarray(w) for w in weights)
            for w in frozen:
                w.flags.writeable = False  # shared with every handler: nobody may change it
            participants = self._sample(number)
            previous = self._round
            if previous is not None and previous.number != number:  # it completed: its updates stay counted
                self._counted.update(dict.fromkeys(previous.counted or (), previous.number))
            self._strategy.begin_round(
                frozen, self.run.num_clients if participants is None else len(participants)
            )
            self._round = _Round(number, frozen, participants, self._secure_round(number, participants))
            self._last_round = number
            self._phase = Phase.TRAINING
            self._notify_everyone()
        self._tell_listeners()

    def _sample(self, number: int) -> frozenset[int] | None:
        """The clients that train round `number`: a sample seeded by (seed, round), so a
        restarted server draws the same clients again."""
        if self.clients_per_round is None:
            return None
        pool = sorted(self._ready)
        rng = random.Random(f"{self._sample_seed}:{number}")
        if self.sampling == "poisson":  # each client on its own, with probability K/N: may be none
            rate = self.clients_per_round / self.run.num_clients
            return frozenset(client for client in pool if rng.random() < rate)
        return frozenset(rng.sample(pool, min(self.clients_per_round, len(pool))))

    def _secure_round(self, number: int, participants: frozenset[int] | None) -> SecAggRound | None:
        """A fresh secure aggregation for this attempt at round `number` (lock held), over the
        clients that may train it now."""
        if self.run.secagg is None:
            return None
        eligible = [
            c
            for c in sorted(self._ready)
            if (participants is None or c in participants)
            and self._joined_during.get(c, 0) < number
            and c not in self._left_out
        ]
        strategy = self._strategy
        assert isinstance(strategy, SecAggStrategy)
        eligible = [c for c in eligible if c not in strategy.isolation.excluded]
        secure = SecAggRound(
            self.run.run_id, number, eligible, self.run.secagg, on_change=self._tell_listeners,
            groups=strategy.isolation.groups(eligible, f"{self._sample_seed}:{number}:{time.monotonic_ns()}"),
            apart=frozenset(strategy.apart),
        )  # fmt: skip
        strategy.secagg = secure
        return secure

    def leave_out(self, clients: Sequence[int]) -> None:
        """Keep these clients out of every later secure aggregation of the run."""
        with self._changed:
            self._left_out.update(clients)

    @property
    def secure_round(self) -> SecAggRound | None:
        """The open (or last) round's secure aggregation, if the run has it."""
        with self._changed:
            return self._round.secure if self._round is not None else None

    def secure_round_of(self, number: int) -> SecAggRound:
        """Round `number`'s secure aggregation, for a client's step (StaleRoundError if that round
        is not the open or last one)."""
        with self._changed:
            current = self._round
            if current is None or current.number != number or current.secure is None:
                raise StaleRoundError(
                    f"round {number} has no secure aggregation under way (open round: "
                    f"{current.number if current else 'none'}); ask for the next instruction"
                )
            return current.secure

    def participants(self, number: int) -> list[int]:
        """Who was to train round `number` (the open or last round): its sample, or every client."""
        with self._changed:
            current = self._round
            if current is None or current.number != number:
                return []
            if current.participants is None:
                return list(range(1, self.run.num_clients + 1))
            return sorted(current.participants)

    @property
    def expected(self) -> int:
        """Updates the open round waits for: its sample, or every enrolled client."""
        with self._changed:
            return self._expected(self._round)

    def wait_ready(self, count: int, timeout: float | None = None) -> bool:
        """Block until `count` clients are ready to train (have asked for their first task);
        False on timeout or interrupt, RunFailedError once withdrawals leave too few clients."""
        with self._changed:
            return self._wait(lambda: len(self._ready) >= count, timeout)

    def wait_all_ready(self, timeout: float | None = None) -> bool:
        """Block until every enrolled client is ready or has withdrawn; False on timeout or interrupt."""
        with self._changed:
            everyone = self.run.num_clients
            return self._wait(lambda: len(self._ready) + len(self._withdrawn) >= everyone, timeout)

    def wait_for_everyone(self, timeout: float | None = None) -> bool:
        """Block until every client the open round still expects has sent its update (one that
        withdraws meanwhile is no longer expected, and an update it sent before does not stand in
        for another client's); False on timeout or interrupt."""
        with self._changed:
            current = self._require_round()
            return self._wait(lambda: self._everyone_in(current), timeout)

    def wait_for_updates(self, count: int, timeout: float | None = None) -> bool:
        """Block until the open round holds `count` accepted updates, or every client it still
        expects has reported (no more will come); False on timeout or interrupt."""
        with self._changed:
            current = self._require_round()
            return self._wait(lambda: len(current.accepted) >= count or self._everyone_in(current), timeout)

    def close_round(self, *, allow_empty: bool = False) -> RoundOutcome:
        """Stop taking updates and aggregate them. `allow_empty`: a round with none is still
        aggregated (DP with Poisson sampling: its global weights move by noise alone)."""
        with self._changed:
            current = self._require_round()
            # A Poisson sample of no client (participants empty) leaves the model as it was.
            unchanged = not current.accepted and not allow_empty
            if unchanged and current.participants != frozenset():
                raise RuntimeError(f"round {current.number} has no updates to aggregate")
            self._phase = Phase.AGGREGATING
            self._notify_everyone()
        self._tell_listeners()
        self._folder.drain()  # handlers now refuse new updates: no fold can be queued meanwhile
        secure = current.secure
        if secure is not None and not secure.run_unmasking(  # no result: the round is redone
            sorted(current.accepted), self.secagg_timeout_s, lambda: self._interrupted
        ):
            raise SecAggError(secure.reason or "the secure aggregation was aborted")
        weights = list(current.weights) if unchanged else self._strategy.result()
        counted = sorted(current.accepted.values(), key=lambda u: u.client_id)
        if secure is not None:  # an update counts once its group's sum was unmasked and used
            counted = [u for u in counted if u.client_id in secure.counted]
        with self._changed:  # only these are answered ALREADY_EXISTS from now on
            current.counted = frozenset(u.client_id for u in counted)
        return RoundOutcome(
            round=current.number,
            weights=weights,
            updates=counted,
            bytes_in=current.bytes_in,
            bytes_out=current.bytes_out,
        )

    def open_evaluation(self, number: int, weights: Sequence[np.ndarray], fraction: float = 1.0) -> int:
        """Ask a seeded sample (`fraction`) of the ready clients to evaluate `weights`, the global
        model after round `number`; returns how many were asked."""
        with self._changed:
            frozen = tuple(np.asarray(w) for w in weights)
            for w in frozen:
                w.flags.writeable = False
            pool = sorted(self._ready)
            size = max(1, round(fraction * len(pool))) if pool else 0
            chosen = random.Random(f"evaluate:{self._sample_seed}:{number}").sample(pool, size)
            self._evaluation = _Evaluation(number, frozen, frozenset(chosen))
            self._phase = Phase.EVALUATING
            self._notify_everyone()
        self._tell_listeners()
        return size

    def wait_for_evaluations(self, count: int, timeout: float | None = None) -> bool:
        """Block until `count` reports are in; False on timeout or interrupt."""
        with self._changed:
            current = self._require_evaluation()

            def done() -> bool:  # a client asked that withdrew since will not report
                gone = (current.participants & self._withdrawn.keys()) - current.reports.keys()
                return len(current.reports) + len(gone) >= count

            return self._wait(done, timeout)

    def close_evaluation(self) -> list[EvaluationReport]:
        with self._changed:
            current = self._require_evaluation()
            self._evaluation = None
            self._phase = Phase.AGGREGATING
            self._notify_everyone()
        self._tell_listeners()
        return sorted(current.reports.values(), key=lambda r: r.client_id)

    def finish(self) -> None:
        """The run is over: every client that asks from now on is told FINISHED."""
        with self._changed:
            self._phase = Phase.FINISHED
            self._notify_everyone()
        self._tell_listeners()

    def interrupt(self) -> None:
        """The server is stopping: every wait returns now, clients are told WAIT, not FINISHED."""
        with self._changed:
            self._interrupted = True
            self._notify_everyone()
        self._tell_listeners()

    @property
    def interrupted(self) -> bool:
        return self._interrupted

    # -- handler side --------------------------------------------------------------

    @property
    def current_round(self) -> int:
        return self._last_round

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def finished(self) -> bool:
        return self._phase is Phase.FINISHED

    @property
    def ready_clients(self) -> int:
        return len(self._ready)

    @property
    def fold_queue_depth(self) -> int:
        return self._folder.depth

    @property
    def global_weights(self) -> tuple[np.ndarray, ...]:
        """The weights the open (or last) round started from; read-only arrays."""
        with self._changed:
            return self._require_round().weights

    @property
    def received(self) -> int:
        with self._changed:
            return len(self._round.accepted) if self._round is not None else 0

    def accepted_updates(self) -> list[AcceptedUpdate]:
        """The open (or last) round's accepted updates, by client id."""
        with self._changed:
            current = self._round
            return [] if current is None else sorted(current.accepted.values(), key=lambda u: u.client_id)

    def poll_task(self, client_id: int, after_round: int) -> Task | None:
        """What this client should do now, or None when it should wait for a phase change.

        `after_round` is the last round the client finished (0 for a new client): the first
        call marks the client ready. Never blocks; answers WAIT once the server is stopping.
        """
        self.check_client(client_id)
        with self._changed:
            if client_id not in self._ready:
                self._ready.add(client_id)
                self._withdrawn.pop(client_id, None)  # it takes part again
                if after_round == 0 and self._phase is Phase.TRAINING and self._round is not None:
                    self._joined_during[client_id] = self._round.number
                self._changed.notify_all()
            if self._phase is Phase.FINISHED:
                self._told_finished.add(client_id)
                self._changed.notify_all()
                return Task(Instruction.FINISHED, self._last_round)
            if self._interrupted:
                return Task(Instruction.WAIT, self._last_round)
            current = self._round
            if self._phase is Phase.TRAINING and current is not None and self._may_train(client_id, current):
                return Task(Instruction.TRAIN, current.number, current.weights)
            evaluation = self._evaluation
            if (
                self._phase is Phase.EVALUATING
                and evaluation is not None
                and client_id in evaluation.participants
                and client_id not in evaluation.reports
            ):
                return Task(Instruction.EVALUATE, evaluation.number, evaluation.weights)
            return None

    def next_task(self, client_id: int, after_round: int, timeout: float) -> Task:
        """poll_task, waiting up to `timeout` seconds for something to do (WAIT when nothing came)."""
        deadline = time.monotonic() + timeout
        while True:
            task = self.poll_task(client_id, after_round)
            if task is not None:
                return task
            with self._changed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return Task(Instruction.WAIT, self._last_round)
                self._phase_changed.wait(remaining)

    def wait_told_finished(self, client_ids: Sequence[int], timeout: float) -> bool:
        """After finish(): wait until these clients have been told, so none is left hanging."""
        with self._changed:
            return self._changed.wait_for(lambda: self._told_finished.issuperset(client_ids), timeout)

    def check_client(self, client_id: int) -> None:
        self.run.check_client_id(client_id)

    def withdraw(self, client_id: int, reason: str) -> bool:
        """The client cannot take part (`reason`, already checked): the first round and every
        round stop waiting for it until it asks for a task again. False if it had withdrawn
        already (its reason is updated, but a client that repeats itself is not news)."""
        self.check_client(client_id)
        with self._changed:
            new = client_id not in self._withdrawn
            self._withdrawn[client_id] = self._withdrawals[client_id] = reason
            self._ready.discard(client_id)
            self._changed.notify_all()
        return new

    @property
    def withdrawals(self) -> dict[int, str]:
        """Every client that withdrew during the run, and its last reason."""
        with self._changed:
            return dict(sorted(self._withdrawals.items()))

    def check_header(
        self,
        client_id: int,
        round_number: int,
        num_examples: int,
        specs: Sequence[TensorSpec],
        metrics: Mapping[str, float] | None = None,
        session: bytes = b"",
    ) -> tuple[np.ndarray, ...]:
        """Everything about an update that can be checked before its tensors are read; returns
        the weights the round started from (what compressed updates are relative to).
        `session`: under secure aggregation, the attempt the update was masked for."""
        self.check_client(client_id)
        with self._changed:
            current = self._check_round(client_id, round_number, session)
        check_num_examples(num_examples, self._max_examples)
        check_specs(self.update_specs, specs)
        if metrics is not None:
            _checked_metrics(metrics, secure=self.run.secagg is not None)
        return self._reference(current)

    def tensor_preparer(self, reference: Sequence[np.ndarray], num_examples: int) -> UpdatePreparer:
        """What a stream intake applies to each decoded tensor, on the receiving thread: the
        strategy's `prepare` and bound. While updates are recorded, tensors are kept as sent
        (the recorder saves them) and prepared again on the fold thread."""
        return UpdatePreparer(
            self._strategy,
            self.update_specs,
            reference,
            num_examples,
            keep_as_sent=self._recorder is not None,
        )

    def submit(
        self,
        client_id: int,
        round_number: int,
        num_examples: int,
        metrics: Mapping[str, float],
        update: Sequence[np.ndarray],
        wire_bytes: int,
        *,
        preparer: UpdatePreparer | None = None,
        on_folded: Callable[[], None] | None = None,
        session: bytes = b"",
    ) -> tuple[int, int]:
        """Validate and count one update; returns (updates received, updates expected).

        `preparer`: the one this update's tensors already went through (the stream intake
        applies it tensor by tensor while the stream arrives), so every tensor was checked
        against the specs, bounded and prepared; without it the whole update is checked and
        prepared here. `on_folded` runs once the update is in the aggregate (or was refused):
        the caller's buffers may be reused from then on.
        """
        strategy = self._strategy
        prepared = preparer is not None and self._recorder is None

        def fold(reference: Sequence[np.ndarray]) -> None:
            try:
                if isinstance(strategy, SecAggStrategy):  # masked words: summed by the sender's group
                    strategy.add_from(client_id, update)
                elif prepared:
                    strategy.add(update, num_examples)
                else:
                    add_update(strategy, update, reference, num_examples)
            finally:
                if on_folded is not None:
                    on_folded()

        queued = False
        try:
            self.check_client(client_id)
            check_num_examples(num_examples, self._max_examples)
            checked_metrics = _checked_metrics(metrics, secure=self.run.secagg is not None)
            with self._changed:
                current = self._check_round(client_id, round_number, session)
            if preparer is None:
                check_arrays(self.update_specs, update)
                # The caller's arrays: checked through prepared copies, never overwritten.
                preparer = UpdatePreparer(
                    self._strategy,
                    self.update_specs,
                    self._reference(current),
                    num_examples,
                    keep_as_sent=True,
                )
                for index, tensor in enumerate(update):
                    preparer(index, tensor)
            with self._changed:
                current = self._check_round(client_id, round_number, session)
                if self._recorder is not None:  # before the fold is queued: a fold may free the update
                    self._recorder(round_number, client_id, update)
                self._folder.put(
                    partial(fold, self._reference(current))
                )  # under the lock: folds keep the order
                queued = True
                current.accepted[client_id] = AcceptedUpdate(
                    client_id, num_examples, checked_metrics, preparer.largest
                )
                current.bytes_in += wire_bytes
                self._changed.notify_all()
                return len(current.accepted), self._expected(current)
        finally:
            if not queued and on_folded is not None:
                on_folded()  # refused: nothing will be folded

    def submit_evaluation(
        self, client_id: int, round_number: int, num_examples: int, metrics: Mapping[str, float]
    ) -> tuple[int, int]:
        """Record one client's evaluation report; returns (reports received, reports expected)."""
        self.check_client(client_id)
        if num_examples > self._max_examples:
            raise UpdateRejectedError(
                f"num_examples {num_examples} is above this server's limit of {self._max_examples}"
            )
        checked = _checked_metrics(metrics)
        with self._changed:
            evaluation = self._evaluation
            if self._phase is not Phase.EVALUATING or evaluation is None or evaluation.number != round_number:
                raise StaleRoundError(
                    f"the server is not collecting evaluations of round {round_number}; "
                    "ask for the next instruction"
                )
            if client_id not in evaluation.participants:
                raise StaleRoundError(f"client {client_id} was not asked to evaluate round {round_number}")
            if client_id in evaluation.reports:
                raise UpdateRejectedError(
                    f"client {client_id} already reported its evaluation of round {round_number}",
                    code="ALREADY_EXISTS",
                )
            evaluation.reports[client_id] = EvaluationReport(client_id, num_examples, checked)
            self._changed.notify_all()
            return len(evaluation.reports), len(evaluation.participants)

    def count_bytes_out(self, round_number: int, nbytes: int) -> None:
        with self._changed:
            if self._round is not None and self._round.number == round_number:
                self._round.bytes_out += nbytes

    # -- internals (call with the lock held) -----------------------------------------

    def _wait(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """The driver's waits: until `done`, the timeout or an interrupt (False unless done and
        not interrupted). Every withdrawal wakes them: RunFailedError once too few clients are left."""
        self._changed.wait_for(lambda: done() or self._interrupted or self._too_few(), timeout)
        if self._too_few() and not self._interrupted:
            raise self._too_few_error()
        return done() and not self._interrupted

    def _too_few(self) -> bool:
        return self.run.num_clients - len(self._withdrawn) < self.min_clients

    def _too_few_error(self) -> RunFailedError:
        left = self.run.num_clients - len(self._withdrawn)
        named = "; ".join(f"client {c}: {why}" for c, why in sorted(self._withdrawn.items()))
        return RunFailedError(
            f"only {left} of {self.run.num_clients} clients can still take part, fewer than "
            f"--min-clients {self.min_clients}, because these withdrew ({named}); stopping. Fix what "
            "they report and start them again, or lower --min-clients; the last checkpoint is intact: "
            "start the server again with the same --out to resume"
        )

    def _everyone_in(self, current: _Round) -> bool:
        """Every client the round still expects has reported. Under secure aggregation that is
        every client that shared its keys (its masked update is needed, withdrawn or not);
        otherwise only updates of clients that have not withdrawn count toward it."""
        if current.secure is not None and current.secure.shared:
            return len(current.accepted) >= len(current.secure.shared)
        return len(current.accepted.keys() - self._withdrawn.keys()) >= self._expected(current)

    def _expected(self, current: _Round | None) -> int:
        if current is not None and current.secure is not None and current.secure.shared:
            return len(current.secure.shared)  # the masked updates this attempt waits for
        if current is None or current.participants is None:
            return self.run.num_clients - len(self._withdrawn)
        return len(current.participants - self._withdrawn.keys())

    def _notify_everyone(self) -> None:
        self._changed.notify_all()
        self._phase_changed.notify_all()

    def _tell_listeners(self) -> None:
        for listener in self._listeners:
            listener()

    def _reference(self, current: _Round) -> tuple[np.ndarray, ...]:
        """What an update's tensors are checked against: the round's weights (and the count's place)."""
        if current.secure is None:
            return current.weights
        return (*current.weights, np.zeros(1, np.uint32))

    def _may_train(self, client_id: int, current: _Round) -> bool:
        return (
            client_id not in current.accepted
            and self._joined_during.get(client_id, 0) < current.number
            and (current.participants is None or client_id in current.participants)
            and (current.secure is None or current.secure.may_start(client_id))
        )

    def _require_evaluation(self) -> _Evaluation:
        if self._evaluation is None:
            raise RuntimeError("no evaluation was opened")
        return self._evaluation

    def _require_round(self) -> _Round:
        if self._round is None:
            raise RuntimeError("no round was opened")
        return self._round

    def _check_round(self, client_id: int, round_number: int, session: bytes = b"") -> _Round:
        current = self._round
        if self._counted_before(client_id, round_number, session):
            raise UpdateRejectedError(
                f"client {client_id} already submitted an update for round {round_number}; "
                "it was counted once",
                code="ALREADY_EXISTS",
            )
        if self._phase is Phase.FINISHED:
            raise StaleRoundError(
                f"the run is finished; round {round_number} is closed", current_round=self._last_round
            )
        if current is None or self._phase is not Phase.TRAINING or round_number != current.number:
            open_now = current.number if current is not None and self._phase is Phase.TRAINING else None
            if open_now is not None:
                state = str(open_now)
            elif self._phase is Phase.WAITING:
                state = "none yet, the server is waiting for its clients to be ready"
            elif self._phase is Phase.EVALUATING:
                state = f"none, clients are evaluating round {self._last_round}"
            else:
                state = f"none, the server is aggregating round {self._last_round}"
            raise StaleRoundError(
                f"round {round_number} is not open (open round: {state}); "
                "fetch the current weights and train again",
                current_round=open_now,
            )
        if current.participants is not None and client_id not in current.participants:
            raise StaleRoundError(
                f"client {client_id} was not sampled for round {current.number}; "
                "it waits for a round that samples it",
                current_round=current.number,
            )
        if self._joined_during.get(client_id, 0) >= current.number:
            raise StaleRoundError(
                f"client {client_id} joined while round {current.number} was open; "
                "it takes part from the next round",
                current_round=current.number,
            )
        if current.secure is not None:
            current.secure.may_submit(client_id, session)
        return current

    def _counted_before(self, client_id: int, round_number: int, session: bytes) -> bool:
        """A retry of an update that was counted: in the open or last round's attempt (under
        secure aggregation, masked for that attempt's session), open or closed since (once
        closed, only the updates its aggregate holds), or in a round that completed before."""
        current = self._round
        if current is not None and current.number == round_number:
            held = current.accepted if current.counted is None else current.counted
            return client_id in held and (current.secure is None or session == current.secure.session)
        return self._counted.get(client_id) == round_number


def _checked_metrics(metrics: Mapping[str, float], *, secure: bool = False) -> dict[str, float]:
    """`secure`: an update under secure aggregation, which may carry timings only."""
    try:
        checked = check_metrics(metrics)
    except MetricsError as exc:
        raise UpdateRejectedError(str(exc)) from None
    if secure:
        other = sorted(name for name in checked if not name.endswith(TIMING_SUFFIX))
        if other:
            raise UpdateRejectedError(
                f"under secure aggregation an update may carry timings only (metric names ending in "
                f"{TIMING_SUFFIX!r}), not {other[0]!r}: one client's metrics would say something about "
                "its data; leave them out"
            )
    return checked
