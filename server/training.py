"""Opening and closing an attempt at a training round (the transitions into and out of
`training` of fedgrpc.server.phases).

Opening draws the round's sample, tells the round mode (a fresh secure aggregation, under
it) and freezes the weights every handler shares. Closing stops taking updates, waits for
the fold thread, and asks the mode for the result; under secure aggregation only the updates
whose group's sum was unmasked and used count, and an attempt that yields nothing raises
SecAggError (the round is trained again from the same weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .fold_thread import FoldThread
from .phases import AcceptedUpdate, OpenRound, Phase, RoundState
from .round_mode import RoundMode
from .round_settings import RoundPlan
from .sampling import ClientSampler


@dataclass
class RoundOutcome:
    """A closed round: the new global weights and who made them."""

    round: int
    weights: list[np.ndarray]
    updates: list[AcceptedUpdate]
    bytes_in: int
    bytes_out: int


class TrainingRounds:
    def __init__(
        self,
        state: RoundState,
        sampler: ClientSampler,
        mode: RoundMode,
        folder: FoldThread,
        plan: RoundPlan | None = None,
    ) -> None:
        self._state = state
        self._sampler = sampler
        self._mode = mode
        self._folder = folder
        self._plan = plan or RoundPlan(strategy=mode.strategy)

    def open(self, number: int, weights: Sequence[np.ndarray]) -> None:
        """Open an attempt at round `number` from `weights`; its TRAIN carries the round's client
        settings and the strategy protocol's extras (fedgrpc.server.round_settings)."""
        state = self._state
        settings, extras = self._plan.settings(number), self._plan.extras()
        with state.changed:
            if state.phase is Phase.FINISHED:
                raise RuntimeError("the run is finished")
            frozen = tuple(np.asarray(w) for w in weights)
            for w in frozen:
                w.flags.writeable = False  # shared with every handler: nobody may change it
            participants = self._sampler.trainers(number, state.roster.ready)
            previous = state.round
            if previous is not None and previous.number != number:  # it completed: its updates stay counted
                state.counted.update(dict.fromkeys(previous.counted or (), previous.number))
            roster = state.roster
            eligible = [
                c
                for c in sorted(roster.ready)
                if (participants is None or c in participants)
                and not roster.late_for(c, number)
                and c not in roster.left_out
            ]
            count = self._state.run.num_clients if participants is None else len(participants)
            secure = self._mode.begin(number, frozen, count, eligible)
            state.round = OpenRound(number, frozen, participants, secure, settings=settings, extras=extras)
            state.last_round = number
            change = state.enter(Phase.TRAINING, number)
        state.announce(change)

    def close(self, *, allow_empty: bool = False) -> RoundOutcome:
        """Stop taking updates and aggregate them. `allow_empty`: a round with none is still
        aggregated (DP with Poisson sampling: its global weights move by noise alone)."""
        state = self._state
        with state.changed:
            current = state.require_round()
            # A Poisson sample of no client (participants empty) leaves the model as it was.
            unchanged = not current.accepted and not allow_empty
            if unchanged and current.participants != frozenset():
                raise RuntimeError(f"round {current.number} has no updates to aggregate")
            expected = self._sample_of(current)
            change = state.enter(Phase.AGGREGATING, current.number, tuple(expected))
        state.announce(change)
        self._folder.drain()  # handlers now refuse new updates: no fold can be queued meanwhile
        secure = current.secure
        if secure is None and unchanged:
            weights = list(current.weights)
        else:  # under secure aggregation, SecAggError: no result, the round is redone
            weights = self._mode.result(secure, sorted(current.accepted), lambda: state.interrupted)
        counted = sorted(current.accepted.values(), key=lambda u: u.client_id)
        if secure is not None:  # an update counts once its group's sum was unmasked and used
            counted = [u for u in counted if u.client_id in secure.counted]
        with state.changed:  # only these are answered ALREADY_EXISTS from now on
            current.counted = frozenset(u.client_id for u in counted)
        return RoundOutcome(current.number, weights, counted, current.bytes_in, current.bytes_out)

    def participants(self, number: int) -> list[int]:
        """Who was to train round `number` (the open or last round): its sample, or every client."""
        with self._state.changed:
            current = self._state.round
            return [] if current is None or current.number != number else self._sample_of(current)

    def _sample_of(self, current: OpenRound) -> list[int]:
        if current.participants is None:
            return list(range(1, self._state.run.num_clients + 1))
        return sorted(current.participants)
