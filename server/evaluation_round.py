"""Federated evaluation after a round: a seeded sample of the ready clients evaluates the new
global weights on its own held-out data, and each reports once.

    aggregating --open(r)--> evaluating --close()--> aggregating

Runs on the round state's lock (fedgrpc.server.phases); the driver opens, waits and closes,
handlers submit. The reports' mean is fedgrpc.server.evaluation's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..common.errors import StaleRoundError, UpdateRejectedError
from .phases import Phase, RoundState
from .sampling import ClientSampler
from .update_admission import checked_metrics


@dataclass(frozen=True)
class EvaluationReport:
    """One client's metrics of the global model on its held-out data (num_examples 0: it has none)."""

    client_id: int
    num_examples: int
    metrics: Mapping[str, float]


@dataclass
class Evaluation:
    number: int
    weights: tuple[np.ndarray, ...]
    participants: frozenset[int]
    reports: dict[int, EvaluationReport] = field(default_factory=dict)

    def asks(self, client_id: int) -> bool:
        """Whether `client_id` is to evaluate and has not reported yet."""
        return client_id in self.participants and client_id not in self.reports


class FederatedEvaluations:
    def __init__(self, state: RoundState, sampler: ClientSampler, max_examples: int) -> None:
        self._state = state
        self._sampler = sampler
        self._max_examples = max_examples

    def open(self, number: int, weights: Sequence[np.ndarray], fraction: float = 1.0) -> int:
        """Ask a seeded sample (`fraction`) of the ready clients to evaluate `weights`, the global
        model after round `number`; returns how many were asked."""
        state = self._state
        with state.changed:
            frozen = tuple(np.asarray(w) for w in weights)
            for w in frozen:
                w.flags.writeable = False
            chosen = self._sampler.evaluators(number, state.roster.ready, fraction)
            state.evaluation = Evaluation(number, frozen, chosen)
            change = state.enter(Phase.EVALUATING, number)
        state.announce(change)
        return len(chosen)

    def wait(self, count: int, timeout: float | None = None) -> bool:
        """Block until `count` reports are in; False on timeout or interrupt."""
        state = self._state
        with state.changed:
            current = self._require()

            def done() -> bool:  # a client asked that withdrew since will not report
                gone = (current.participants & state.roster.withdrawn.keys()) - current.reports.keys()
                return len(current.reports) + len(gone) >= count

            return state.wait(done, timeout)

    def close(self) -> list[EvaluationReport]:
        state = self._state
        with state.changed:
            current = self._require()
            state.evaluation = None
            change = state.enter(Phase.AGGREGATING, current.number)
        state.announce(change)
        return sorted(current.reports.values(), key=lambda r: r.client_id)

    def submit(
        self, client_id: int, round_number: int, num_examples: int, metrics: Mapping[str, float]
    ) -> tuple[int, int]:
        """Record one client's evaluation report; returns (reports received, reports expected)."""
        state = self._state
        state.run.check_client_id(client_id)
        if num_examples > self._max_examples:
            raise UpdateRejectedError(
                f"num_examples {num_examples} is above this server's limit of {self._max_examples}"
            )
        checked = checked_metrics(metrics)
        with state.changed:
            evaluation = state.evaluation
            if state.phase is not Phase.EVALUATING or evaluation is None or evaluation.number != round_number:
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
            state.changed.notify_all()
            return len(evaluation.reports), len(evaluation.participants)

    def _require(self) -> Evaluation:
        if self._state.evaluation is None:
            raise RuntimeError("no evaluation was opened")
        return self._state.evaluation
