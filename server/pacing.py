"""Check-in pacing ("pace steering", Bonawitz et al. 2019): a client the server does not need now
is told when to come back, and holds no call until then.

What a client's GetGlobalWeights gets, when there is no work for it yet:

    it is needed now (every client trains every round,    held long-poll, as always
    or it is in the open round's sample and has not       (fedgrpc.server.longpoll)
    sent its update), or it did not ask to be paced
    otherwise (not sampled, its update is in, rounds       WAIT at once, retry_after =
    are between two, or none has opened yet)               until the next round is expected
                                                           + its own point in the window

The next opening is expected one mean round interval (open to next open, the last few rounds)
after the open round opened; before any round has closed, and between rounds, now. The window
is `ready clients / checkin_rate` seconds (at least MIN_WINDOW_S), and each client's point in
it is a hash of (client, round): spread, the same if it asks twice, so the clients sent away
come back at about `checkin_rate` a second and no thundering herd meets the next round. A
sampled client is back within one window of its round opening. This is stable: a round lasts
about one window (its sample checking in) plus its work, which is what the next interval
measures, so the clients sent away during it arrive as the next round opens, not one window
later each round.

Threads: `phase` is called on the driver's thread (RoundCoordinator.watch_phase), the rest on
the event loop; the round timings are replaced whole, never changed in place.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .phases import Phase, PhaseChange, RoundState

#: The shortest window the clients sent away are spread over (a small run's).
MIN_WINDOW_S = 0.5
#: Round intervals the expected next opening is the mean of.
INTERVALS_KEPT = 5
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Paced:
    """WAIT at once: hold no call for `retry_after_s`, then ask again (round: the last opened)."""

    round: int
    retry_after_s: float


@dataclass(frozen=True)
class _Timings:
    phase: Phase
    opened_at: float | None  # when the open (or last) round opened, monotonic
    intervals: tuple[float, ...]  # open-to-next-open of the last rounds


def needed(state: RoundState, client_id: int) -> bool:
    """Lock held: whether this client may get work before the phase changes again (it is in
    the open round's sample, every client when there is none, and its update is not in)."""
    current = state.round
    if state.phase is not Phase.TRAINING or current is None:
        return False
    in_sample = current.participants is None or client_id in current.participants
    return in_sample and client_id not in current.accepted


def point(client_id: int, round_number: int) -> float:
    """A pseudo-random point in [0, 1) for (client, round): splitmix64 of the two."""
    x = (client_id * 0x9E3779B97F4A7C15 + round_number * 0xC2B2AE3D27D4EB4F) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) / 2.0**64


class Pacer:
    """Tells the clients the server does not need now when to come back."""

    def __init__(
        self, checkin_rate: float, max_delay_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """`checkin_rate`: check-ins a second the clients sent away should come back at;
        `max_delay_s`: the longest wait for the next round told (its window comes on top)."""
        self._rate = checkin_rate
        self._max_delay_s = max_delay_s
        self._clock = clock
        self._timings = _Timings(Phase.WAITING, None, ())
        self._back_by = 0.0  # when the last client told to come back is due, monotonic

    def phase(self, change: PhaseChange) -> None:
        """The driver's thread: a phase change (a round opening is a new interval)."""
        old, now = self._timings, self._clock()
        if change.phase is not Phase.TRAINING:
            self._timings = _Timings(change.phase, old.opened_at, old.intervals)
            return
        intervals = old.intervals
        if old.opened_at is not None and old.phase is not Phase.TRAINING:  # a new round, not a retry
            intervals = tuple(deque((*intervals, now - old.opened_at), maxlen=INTERVALS_KEPT))
        self._timings = _Timings(Phase.TRAINING, now, intervals)

    def window_s(self, ready: int) -> float:
        """Seconds the clients sent away are spread over: `ready` of them at the check-in rate."""
        return max(MIN_WINDOW_S, ready / self._rate)

    def until_next_round_s(self) -> float:
        """Seconds until the next round is expected to open (0: now, or overdue)."""
        timings, now = self._timings, self._clock()
        if timings.phase is not Phase.TRAINING or timings.opened_at is None:
            return 0.0
        if not timings.intervals:  # no round closed yet: come back within the window
            return 0.0
        expected = sum(timings.intervals) / len(timings.intervals)
        return min(self._max_delay_s, max(0.0, expected - (now - timings.opened_at)))

    def retry_after(self, client_id: int, last_round: int, ready: int) -> Paced:
        """The WAIT for a client not needed now: the next round's expected opening, then the
        client's own point in the window."""
        spread = point(client_id, last_round) * self.window_s(ready)
        paced = Paced(last_round, self.until_next_round_s() + spread)
        self._back_by = max(self._back_by, self._clock() + paced.retry_after_s)
        return paced

    def away_s(self) -> float:
        """Seconds until every client told to come back is due, and a second to ask (0: none
        away): the run's end waits that long for them to hear it is finished."""
        return max(0.0, self._back_by + 1.0 - self._clock()) if self._back_by else 0.0
