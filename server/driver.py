"""The round driver: a run's rounds one after another, each told as events (server.events).

    wait for clients --> round r: budget left? --> open, collect (RoundPolicy) --> close
        --> new weights finite? --> evaluate --> RoundClosed, one log line --> round r + 1
    ... --> RunFinished --> coordinator finished --> "finished"

Under --mode fedbuff (server.buffered) a round is a model version: it closes once its buffer
holds --buffer-size updates, and the next version opens at once, before the evaluation and the
record, so that clients never wait on them. A budget spent (--dp-target-epsilon) ends the run
after the round before. An attempt that fails
is trained again from the same weights: new weights that are not finite, secure aggregation
aborted (with fresh keys), or every sampled client withdrawn (sampled again); after
MAX_ABORTED_ROUNDS failures in a row the run stops (RunFailedError), keeping the last good
checkpoint. An impossible secure-aggregation sum among fewer than six clients is no such
failure: fedgrpc.server.isolation says the round is lost (another attempt at it would reveal too
much); it is recorded so, the weights unchanged, and the run goes on. A stop requested (SIGTERM:
the coordinator is interrupted) ends the loop after the step in progress. Runs on the server's
main thread; the clients' calls reach the coordinator on the gRPC side meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..common.errors import RunFailedError, SecAggError
from ..common.logs import human_bytes
from ..common.privacy import PrivacyAccountant
from .buffered import BufferedRounds
from .checkpoint import weights_digest
from .evaluation import FederatedEvaluation, describe, main_metric
from .events import EventBus, RoundClosed, RunFinished
from .masked_sum import SecAggStrategy
from .results import ClientReport, FederatedRecord, RoundRecord
from .rounds import RoundCoordinator, RoundOutcome
from .secagg import SecAggRound
from .secure_collect import secure_collect
from .startup import Job
from .strategy import Strategy

if TYPE_CHECKING:
    from .config import ServerConfig

log = logging.getLogger("fedgrpc.server")

#: A round whose new weights are not finite is trained again from the same weights; after this
#: many in a row the server stops, keeping the last good checkpoint.
MAX_ABORTED_ROUNDS = 3


@dataclass(frozen=True)
class _Trained:
    """An attempt at a round that produced new weights."""

    outcome: RoundOutcome
    expected: int  # updates the round waited for
    secure: SecAggRound | None


@dataclass(frozen=True)
class _Again:
    """An attempt that failed: the round is trained again from the same weights."""

    aborted: int  # attempts that failed in a row so far


@dataclass(frozen=True)
class _Lost:
    """An attempt whose round is given up (no failure): the next round, from the same weights."""

    why: str
    secure: SecAggRound | None


@dataclass(frozen=True)
class _Evaluated:
    central: Mapping[str, float] | None
    federated: FederatedRecord | None


class RoundDriver:
    """Drives one run's rounds on a coordinator, publishing what happens to `bus`."""

    def __init__(
        self,
        config: ServerConfig,
        job: Job,
        coordinator: RoundCoordinator,
        strategy: Strategy,
        bus: EventBus,
        *,
        accountant: PrivacyAccountant | None,
        minimum: int,
    ) -> None:
        self.config, self.job, self.coordinator, self.strategy = config, job, coordinator, strategy
        self.bus, self.accountant, self.minimum = bus, accountant, minimum
        self.finished = False  # the coordinator told the clients that the run is finished
        mode = coordinator.mode
        self._buffered = mode if isinstance(mode, BufferedRounds) else None  # --mode fedbuff
        self._told_no_held_out = False

    def wait_for_clients(self) -> None:
        """Block until round one may open: `minimum` clients ready, then the rest or the join timeout."""
        coordinator, run = self.coordinator, self.job.run
        log.info("waiting for %d clients to be ready", run.num_clients)
        coordinator.wait_ready(self.minimum)
        coordinator.wait_all_ready(self.config.policy.join_timeout_s)  # those that withdrew excepted
        if coordinator.interrupted or coordinator.ready_clients >= run.num_clients:
            return
        log.info(
            "starting with %d of %d clients ready; the others join from the round after they arrive",
            coordinator.ready_clients, run.num_clients,
        )  # fmt: skip

    def drive(self) -> None:
        """Every round still to train, until the last, a spent budget, or a stop."""
        number, aborted = self.job.first_round, 0
        while number <= self.job.run.rounds and not self.coordinator.interrupted:
            epsilon = self.accountant.epsilon(number) if self.accountant is not None else None
            if self._over_budget(number, epsilon):
                return
            started, start_digest = time.monotonic(), weights_digest(self.job.weights)
            attempt = self._train(number, aborted)
            if attempt is None:
                return  # stopping
            if isinstance(attempt, _Again):
                aborted = attempt.aborted
                continue  # the same round again, from the same weights
            if isinstance(attempt, _Lost):
                self._lose(number, started, start_digest, attempt, epsilon)
                number += 1
                continue  # the next round, from the same weights
            if not _all_finite(attempt.outcome.weights):
                aborted = self._non_finite(attempt.outcome, aborted + 1)
                continue  # the same round again, from the same weights
            aborted = 0
            self.job.weights = attempt.outcome.weights
            if self._opens_next_now(number):
                self.coordinator.open_round(number + 1, self.job.weights)  # clients go on meanwhile
            evaluated = self._evaluate(number)
            if evaluated is None:
                return  # stopping
            record = self._record(number, started, start_digest, attempt, evaluated, epsilon)
            self._close(record, attempt.expected, epsilon)
            number += 1

    def finish(self) -> None:
        """After the last round: the final results (RunFailedError if they cannot be written),
        then the clients are told."""
        job, last = self.job, (self.job.history[-1] if self.job.history else None)
        main = main_metric(
            job.loaded.task.main_metric,
            last.central if last else None,
            last.federated.metrics if last and last.federated else None,
        )
        self.bus.publish(RunFinished(job.run, tuple(job.history), job.weights, main))
        self.coordinator.finish()
        self.finished = True
        log.info("run finished: results in %s", self.config.out_dir)
        clients = list(range(1, job.run.num_clients + 1))
        grace = self.config.finish_grace_s
        if not self.coordinator.wait_told_finished(clients, grace):
            log.warning("some clients were not told that the run finished within %.0f s", grace)

    # -- one round -----------------------------------------------------------------------

    def _over_budget(self, number: int, epsilon: float | None) -> bool:
        """Whether round `number` would spend more privacy than --dp-target-epsilon allows."""
        dp = self.config.privacy
        target = dp.target_epsilon if dp is not None else None
        if epsilon is None or target is None or epsilon <= target:
            return False
        log.info(
            "privacy budget: round %d would spend epsilon %.3f > --dp-target-epsilon %g; "
            "the run ends after round %d",
            number, epsilon, target, number - 1,
        )  # fmt: skip
        return True

    def _train(self, number: int, aborted: int) -> _Trained | _Again | _Lost | None:
        """Open the round, collect its updates, aggregate them; None when the server is stopping."""
        coordinator, private = self.coordinator, self.config.privacy is not None
        if self._buffered is not None:
            return self._aggregate_buffer(number)
        coordinator.open_round(number, self.job.weights)
        secure = coordinator.secure_round
        try:
            if secure is not None:
                expected = secure_collect(self.config, coordinator, secure, number)
            else:
                expected = coordinator.expected
                floor = min(self.minimum, len(coordinator.participants(number)))  # a sample may be smaller
                if not wait_to_close(coordinator, self.config.policy.timeout_s, expected, number, floor):
                    return None
                if coordinator.received == 0 and floor > 0 and not private:
                    log.warning(
                        "round %d: every sampled client withdrew before sending an update; "
                        "the round is sampled again among the others", number,
                    )  # fmt: skip
                    return _Again(aborted)
            outcome = coordinator.close_round(allow_empty=private)
        except SecAggError as exc:
            if coordinator.interrupted:
                return None
            return self._secure_aborted(number, exc, aborted, secure)
        return _Trained(outcome, expected, secure)

    def _opens_next_now(self, number: int) -> bool:
        """--mode fedbuff: the next version opens before this one is evaluated and recorded,
        unless clients are to evaluate this one (federated evaluation has a phase of its own)."""
        run = self.job.run
        last = number >= run.rounds
        return self._buffered is not None and not last and not run.evaluation.due(number, run.rounds)

    def _aggregate_buffer(self, number: int) -> _Trained | None:
        """--mode fedbuff: version `number` (opened now, or as soon as the last was aggregated)
        is aggregated once its buffer holds K updates; None when the server is stopping."""
        coordinator, buffered = self.coordinator, self._buffered
        assert buffered is not None
        from .phases import Phase

        if not (coordinator.phase is Phase.TRAINING and coordinator.current_round == number):
            coordinator.open_round(number, self.job.weights)
        if not coordinator.wait_for_updates(buffered.buffer_size):
            return None
        return _Trained(coordinator.close_round(), buffered.buffer_size, None)

    def _secure_aborted(
        self, number: int, error: SecAggError, aborted: int, secure: SecAggRound | None
    ) -> _Again | _Lost:
        """Leave out the clients found cheating; the failures in a row, counting this one unless
        it made progress (RunFailedError: too many), or the round lost (fedgrpc.server.isolation)."""
        culprits = sorted(secure.culprits) if secure is not None else []
        self.coordinator.leave_out(culprits)
        strategy = self.strategy if isinstance(self.strategy, SecAggStrategy) else None
        if strategy is not None and strategy.isolation.lost:
            log.error("round %d: secure aggregation aborted: %s", number, error)
            return _Lost(strategy.isolation.lost, secure)
        if strategy is None or not strategy.progress:
            aborted += 1  # one that narrowed down an offender or found a new dispute is no failure
        secure_aborted(number, error, aborted, culprits)
        return _Again(aborted)

    def _lose(
        self, number: int, started: float, start_digest: str, lost: _Lost, epsilon: float | None
    ) -> None:
        """Round `number` is given up: recorded (history, checkpoint), the weights unchanged."""
        log.error(
            "round %d lost: %s. The weights stay as they were and the run goes on with the next round",
            number, lost.why,
        )  # fmt: skip
        dp, job = self.config.privacy, self.job
        record = RoundRecord(
            round=number, seconds=round(time.monotonic() - started, 3), bytes_in=0, bytes_out=0,
            privacy=None if epsilon is None or dp is None else {"epsilon": epsilon, "delta": dp.delta},
            secagg=lost.secure.summary() if lost.secure is not None else None,
            start_digest=start_digest, end_digest=weights_digest(job.weights), lost=lost.why,
        )  # fmt: skip
        job.history.append(record)
        main = main_metric(job.loaded.task.main_metric, None, None)
        self.bus.publish(
            RoundClosed(job.run, record, tuple(job.history), job.weights, self.strategy.state(), main)
        )

    def _non_finite(self, outcome: RoundOutcome, aborted: int) -> int:
        """Name the updates, largest first; RunFailedError after too many in a row."""
        _log_aborted(outcome, aborted)
        if aborted >= MAX_ABORTED_ROUNDS:
            raise RunFailedError(
                f"{aborted} rounds in a row produced non-finite weights; stopping. The "
                f"checkpoint after round {outcome.round - 1} is intact: leave out the clients named "
                "above, or use a robust --strategy, and start the server again to resume"
            )
        return aborted

    def _evaluate(self, number: int) -> _Evaluated | None:
        """Central evaluation when there is a test set, federated when due; None when stopping."""
        job = self.job
        central = job.central(number, job.weights) if job.central else None
        federated = None
        if job.run.evaluation.due(number, job.run.rounds):
            federated = self._federated_evaluation(number, job.weights)
            if federated is None:
                return None
        return _Evaluated(central, federated)

    def _federated_evaluation(self, number: int, weights: Sequence[np.ndarray]) -> FederatedRecord | None:
        """Ask the clients to evaluate the new weights; None when the server is stopping."""
        coordinator, timeout = self.coordinator, self.config.policy.timeout_s
        asked = coordinator.open_evaluation(number, weights, coordinator.run.evaluation.fraction)
        if not coordinator.wait_for_evaluations(asked, timeout):
            if coordinator.interrupted:
                return None
            log.info("round %d: evaluation closed after %.0f s", number, timeout or 0)
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

    def _record(
        self,
        number: int,
        started: float,
        start_digest: str,
        trained: _Trained,
        evaluated: _Evaluated,
        epsilon: float | None,
    ) -> RoundRecord:
        outcome, dp = trained.outcome, self.config.privacy
        return RoundRecord(
            round=number,
            seconds=round(time.monotonic() - started, 3),
            bytes_in=outcome.bytes_in,
            bytes_out=outcome.bytes_out,
            clients=[ClientReport(u.client_id, u.num_examples, dict(u.metrics)) for u in outcome.updates],
            central=evaluated.central,
            federated=evaluated.federated,
            privacy=None if epsilon is None or dp is None else {"epsilon": epsilon, "delta": dp.delta},
            secagg=trained.secure.summary() if trained.secure is not None else None,
            staleness=None
            if self._buffered is None
            else {str(u.client_id): u.staleness or 0 for u in outcome.updates},
            start_digest=start_digest,
            end_digest=weights_digest(self.job.weights),
        )

    def _close(self, record: RoundRecord, expected: int, epsilon: float | None) -> None:
        """The round is complete: the sinks are told (checkpoint, history, dashboard, ...), one line."""
        job = self.job
        job.history.append(record)
        federated = record.federated
        fed_metrics = federated.metrics if federated else None
        reported = len(federated.reports) if federated is not None else None
        main = main_metric(job.loaded.task.main_metric, record.central, fed_metrics)
        state = self.strategy.state()
        self.bus.publish(RoundClosed(job.run, record, tuple(job.history), job.weights, state, main))
        spent = f"  epsilon {epsilon:.3f}" if epsilon is not None else ""
        described = describe(main, record.central, fed_metrics, reported=reported)
        log.info(
            "%s %d/%d  %s%s  %.1f s  up %s  down %s  clients %d/%d",
            "round" if self._buffered is None else "version", record.round, job.run.rounds, described,
            spent, record.seconds, human_bytes(record.bytes_in), human_bytes(record.bytes_out),
            len(record.clients), expected,
        )  # fmt: skip


def wait_to_close(
    coordinator: RoundCoordinator, timeout: float | None, expected: int, number: int, minimum: int
) -> bool:
    """Wait until the open round may close (RoundPolicy); False when the server is stopping.
    RunFailedError: withdrawals left fewer clients than --min-clients."""
    if coordinator.wait_for_everyone(timeout):  # with at least --min-clients, or the run failed
        return True
    if coordinator.interrupted:
        return False
    got = coordinator.received
    if got >= minimum:
        log.info("round %d: closing after %.0f s with %d of %d updates", number, timeout or 0, got, expected)
        return True
    log.warning(
        "round %d: %d of %d updates after %.0f s, fewer than --min-clients %d; waiting for more",
        number, got, expected, timeout or 0, minimum,
    )  # fmt: skip
    return coordinator.wait_for_updates(minimum)


def secure_aborted(number: int, error: SecAggError, aborted: int, culprits: Sequence[int]) -> None:
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


def _all_finite(weights: Sequence[np.ndarray]) -> bool:
    return all(np.isfinite(w).all() for w in weights if np.issubdtype(np.asarray(w).dtype, np.floating))
