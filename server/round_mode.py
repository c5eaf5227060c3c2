"""How a round's updates become its result: in the clear, or under secure aggregation.

The mode is chosen once, from RunSpec.secagg (and --mode fedbuff: BufferedRounds, in
fedgrpc.server.buffered, whose buffer of one model version takes the place of a round), and
every step that differs asks it:

    step              ClearRounds                      SecureRounds
    open an attempt   strategy.begin_round             the same, and a fresh SecAggRound
    update tensors    the model's, then the strategy's the model's, then the masked count
                      extras (SCAFFOLD's delta c_i)
    reference         the round's weights (zeros for   the round's weights, and the count's place
                      the extras)
    fold one update   strategy.add (prepared)          SecAggStrategy.add_from(attempt, ...)
    close             strategy.result()                unmask the attempt, SecAggStrategy.unmasked

Under secure aggregation the attempt's SecAggRound is passed to the strategy with each call
that needs it, so nothing is attached to the strategy between calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from ..common.codec import TensorSpec
from ..common.config import RunSpec
from ..common.errors import SecAggError
from ..common.secagg import COUNT_TENSOR
from .aggregate import Weights
from .buffered import BufferedRounds
from .masked_sum import SecAggStrategy
from .secagg import SecAggRound
from .strategy import Strategy, add_update


class ClearRounds:
    """Updates arrive as they are and are folded one by one into the run's strategy."""

    secure = False

    def __init__(self, strategy: Strategy, specs: Sequence[TensorSpec]) -> None:
        self.strategy = strategy
        # What an update lists: the model's tensors, then the strategy protocol's extras, if it
        # has some (SCAFFOLD's delta c_i), whose changes are taken from zero.
        use_model = getattr(strategy, "use_model", None)
        extras: tuple[TensorSpec, ...] = tuple(use_model(specs)) if use_model is not None else ()
        self.update_specs = (*specs, *extras)
        self._zeros = tuple(_read_only(np.zeros(s.shape, s.dtype)) for s in extras)

    def begin(
        self, number: int, weights: Sequence[np.ndarray], max_updates: int, eligible: Sequence[int]
    ) -> SecAggRound | None:
        self.strategy.begin_round(weights, max_updates)
        return None

    def reference(self, weights: tuple[np.ndarray, ...], round_number: int) -> tuple[np.ndarray, ...]:
        """What an update's tensors are checked against: the round's weights (and zeros for the
        strategy protocol's extras)."""
        return (*weights, *self._zeros) if self._zeros else weights

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
        """On the fold thread. `prepared`: the tensors went through the strategy's prepare."""
        if prepared:
            self.strategy.add(update, num_examples)
        else:
            add_update(self.strategy, update, reference, num_examples)

    def result(
        self, attempt: SecAggRound | None, submitted: Sequence[int], stopping: Callable[[], bool]
    ) -> Weights:
        return self.strategy.result()


class SecureRounds:
    """Each attempt at a round has its SecAggRound; masked updates are summed in the ring
    by their sender's group and unmasked at the close."""

    secure = True

    def __init__(
        self, strategy: SecAggStrategy, run: RunSpec, specs: Sequence[TensorSpec], timeout_s: float
    ) -> None:
        if run.secagg is None:
            raise ValueError("secure rounds need RunSpec.secagg")
        self.strategy = strategy
        self._run = run
        self._spec = run.secagg
        self._timeout_s = timeout_s
        self._on_change: Callable[[], None] = lambda: None
        self._seed = ""
        # What an update lists: the model's tensors, then its masked count.
        self.update_specs = (*specs, TensorSpec(COUNT_TENSOR, "uint32", (1,)))

    def tell(self, on_change: Callable[[], None], seed: int) -> None:
        """`on_change`: called at every stage change of an attempt; `seed`: the run's sample seed."""
        self._on_change = on_change
        self._seed = str(seed)

    def begin(
        self, number: int, weights: Sequence[np.ndarray], max_updates: int, eligible: Sequence[int]
    ) -> SecAggRound:
        """A fresh secure aggregation for this attempt at round `number`, over the `eligible`
        clients that are not excluded."""
        self.strategy.begin_round(weights, max_updates)
        isolation = self.strategy.isolation
        members = [c for c in eligible if c not in isolation.excluded]
        return SecAggRound(
            self._run.run_id, number, members, self._spec, on_change=self._on_change,
            groups=isolation.groups(members, f"{self._seed}:{number}:{time.monotonic_ns()}"),
            apart=frozenset(self.strategy.apart),
        )  # fmt: skip

    def reference(self, weights: tuple[np.ndarray, ...], round_number: int) -> tuple[np.ndarray, ...]:
        """The round's weights and the count's place."""
        return (*weights, np.zeros(1, np.uint32))

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
        """Masked words: summed in the ring of the sender's group."""
        self.strategy.add_from(_required(attempt), client_id, update)

    def result(
        self, attempt: SecAggRound | None, submitted: Sequence[int], stopping: Callable[[], bool]
    ) -> Weights:
        """Close the masked input, wait for the survivors' shares and unmask (SecAggError: this
        attempt yields no result, the round is trained again)."""
        secure = _required(attempt)
        if not secure.run_unmasking(submitted, self._timeout_s, stopping):
            raise SecAggError(secure.reason or "the secure aggregation was aborted")
        return self.strategy.unmasked(secure)


RoundMode = ClearRounds | SecureRounds | BufferedRounds  # the last: --mode fedbuff (server.buffered)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # shared by every update's check
    return array


def _required(attempt: SecAggRound | None) -> SecAggRound:
    if attempt is None:
        raise RuntimeError("a round under secure aggregation has its SecAggRound")
    return attempt
