"""FedBuff (Nguyen et al. 2022), buffered asynchronous aggregation: a round mode beside
ClearRounds and SecureRounds (fedgrpc.server.round_mode), chosen with --mode fedbuff.

A "round" of the state machine (fedgrpc.server.phases) is here one model version's buffer:
version v is open while its buffer fills, and the TRAIN assignment's `round` is the version a
client trains from. Each client's life:

    idle --asks, a slot free (< C training), sampled for v, no update in v's buffer-->
        training v --update trained from r--> (staleness s = v' - r, v' the open version)
            s <= --max-staleness, the server holds r's weights --> in the buffer, weight w(s)
            s >  --max-staleness --> refused, FAILED_PRECONDITION (StaleRoundError): it asks again
        --asks again (or withdraws, or trains longer than --round-timeout)--> idle

    version v open --K updates in the buffer (the driver)--> aggregate --> version v+1 open

The driver opens v+1 as soon as v is aggregated, before evaluating and checkpointing it, so
the clients never wait on the server's bookkeeping. A client puts at most one update in each
buffer: one that has an update in the open buffer waits for the next version (so K <= C, and
each aggregation holds one update per client at most, which is what DP's accounting counts).

Its update's change is taken against the weights of the version it trained from (the server
keeps the last --max-staleness + 1 versions) and scaled by w(s) (fedgrpc.server.staleness) on
the fold thread; the strategy's mean is then sum n_i w(s_i) delta_i / sum n_i, onto which a
server optimizer (FedAdam, ...) takes its step as after a synchronous round. Under DP each
change is clipped first, then scaled (w <= 1 keeps the sensitivity at the clip), and the noise
is added once per aggregation, divided by K.

A checkpoint is written after every aggregation; the buffer is not in it: a resumed server
starts version v+1 with an empty buffer, holds only that version's weights, and refuses an
update trained from an earlier one as stale (its client fetches v+1 and trains again). An
update that was in the lost buffer is simply trained again by its client.

Threads: everything but `reference` and `fold` is called with the round state's lock held
(by phases.RoundState and update_admission); `fold` runs on the fold thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..common.codec import TensorSpec
from ..common.errors import StaleRoundError
from ..common.privacy import clip_factor, l2_norm
from .aggregate import Weights
from .secagg import SecAggRound
from .strategy import Strategy

if TYPE_CHECKING:
    from .config import FedBuffSettings
    from .phases import OpenRound


class BufferedRounds:
    """The round mode of --mode fedbuff, and the rules of who trains and which update counts."""

    secure = False

    def __init__(
        self,
        strategy: Strategy,
        specs: Sequence[TensorSpec],
        settings: FedBuffSettings,
        num_clients: int,
        *,
        slot_timeout_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.strategy = strategy
        self.update_specs = tuple(specs)
        self.slots = settings.slots(num_clients)
        self.buffer_size = settings.buffer(num_clients)
        self.weight = settings.weight
        self.max_staleness = settings.max_staleness
        self._num_clients = num_clients
        self._slot_timeout_s = slot_timeout_s
        self._clock = clock
        self._held: dict[int, tuple[np.ndarray, ...]] = {}  # version -> its weights
        self._training: dict[int, tuple[int, float]] = {}  # client -> (version, since)
        self._counted: dict[int, tuple[int, int]] = {}  # client -> (trained from, buffer) of its last update
        self._pending: dict[int, float] = {}  # client -> w(s) of its update queued for the fold

    # -- the round mode ------------------------------------------------------------------

    def begin(
        self, number: int, weights: Sequence[np.ndarray], max_updates: int, eligible: Sequence[int]
    ) -> SecAggRound | None:
        """Version `number`'s buffer; a buffer holds at most one update per client."""
        self.strategy.begin_round(weights, self._num_clients)
        self._held[number] = tuple(weights)
        for version in [v for v in self._held if v < number - self.max_staleness]:
            del self._held[version]
        for client, (_, buffer) in list(self._counted.items()):
            if buffer == number:  # this version is aggregated again: its last buffer was dropped
                del self._counted[client]
        return None

    def reference(self, weights: tuple[np.ndarray, ...], round_number: int) -> tuple[np.ndarray, ...]:
        """What an update's tensors are checked against: the version its client trained from."""
        held = self._held.get(round_number)
        if held is None:
            raise StaleRoundError(
                f"version {round_number} is no longer held; fetch the current weights and train again"
            )
        return held

    def fold(
        self,
        attempt: SecAggRound | None,
        client_id: int,
        update: Sequence[np.ndarray],
        reference: Sequence[np.ndarray],
        num_examples: int,
        *,
        prepared: bool,
    ) -> None:
        """The update's change (prepared against its own version) scaled by w(s), then added."""
        weight = self._pending.pop(client_id)
        strategy = self.strategy
        changes = [
            t if prepared else strategy.prepare(t, r, num_examples, in_place=False)
            for t, r in zip(update, reference, strict=True)
        ]
        floating = [np.issubdtype(np.asarray(t).dtype, np.floating) for t in changes]
        factor = weight
        if getattr(strategy, "privacy", None) is not None:  # DP: clip first, then weigh
            clip = strategy.privacy.clip  # type: ignore[attr-defined]
            norm = l2_norm([np.asarray(t) for t, f in zip(changes, floating, strict=True) if f])
            factor *= clip_factor(norm, clip)
        scaled = [
            (np.asarray(t) * np.asarray(t).dtype.type(factor)) if f and factor != 1.0 else t
            for t, f in zip(changes, floating, strict=True)
        ]
        strategy.add(scaled, num_examples)

    def result(
        self, attempt: SecAggRound | None, submitted: Sequence[int], stopping: Callable[[], bool]
    ) -> Weights:
        return self.strategy.result()

    # -- who trains, which update counts (lock held) --------------------------------------

    def release(self, client_id: int) -> None:
        """The client is not training (it asks for a task, or withdrew): its slot is free."""
        self._training.pop(client_id, None)

    def may_start(self, client_id: int) -> bool:
        """A slot is free for this client (one it holds already counts)."""
        if client_id in self._training:
            return True
        return self._busy() < self.slots

    def started(self, client_id: int, number: int) -> None:
        self._training[client_id] = (number, self._clock())

    def training(self) -> dict[int, int]:
        """Client -> the version it trains from, of those holding a slot."""
        return {client: version for client, (version, _) in self._training.items()}

    def check(self, client_id: int, round_number: int, current: OpenRound) -> None:
        """An update trained from version `round_number` may join `current`'s buffer
        (StaleRoundError, FAILED_PRECONDITION, with the reason, if not)."""
        version = current.number
        if round_number > version:
            raise StaleRoundError(
                f"version {round_number} is not open (open version: {version}); fetch the current "
                "weights and train again",
                current_round=version,
            )
        staleness = version - round_number
        if staleness > self.max_staleness:
            raise StaleRoundError(
                f"an update trained from version {round_number} is {staleness} versions stale, more "
                f"than --max-staleness {self.max_staleness}; fetch the current weights (version "
                f"{version}) and train again",
                current_round=version,
            )
        if round_number not in self._held:
            raise StaleRoundError(
                f"version {round_number} is no longer held (the server resumed at version "
                f"{min(self._held)}); fetch the current weights and train again",
                current_round=version,
            )
        if client_id in current.accepted:
            raise StaleRoundError(
                f"client {client_id} already has an update in version {version}'s buffer; "
                "it trains the next version",
                current_round=version,
            )

    def counted_before(self, client_id: int, round_number: int) -> bool:
        """A retry of the update this client trained from `round_number`, already in a buffer."""
        last = self._counted.get(client_id)
        return last is not None and last[0] == round_number

    def committed(self, client_id: int, round_number: int, current_number: int) -> int:
        """The update is in `current_number`'s buffer: its slot is free; returns its staleness."""
        staleness = current_number - round_number
        self._training.pop(client_id, None)
        self._counted[client_id] = (round_number, current_number)
        self._pending[client_id] = self.weight(staleness)
        return staleness

    def _busy(self) -> int:
        if self._slot_timeout_s is None:
            return len(self._training)
        now = self._clock()
        return sum(1 for _, since in self._training.values() if now - since <= self._slot_timeout_s)
