"""The aggregate under secure aggregation: masked updates summed in the ring, then unmasked.

SecAggStrategy wraps the run's strategy (FedAvg, a server optimizer, DP-FedAvg's noise). While
a round is open it only adds uint32 words, modulo 2^32, as each masked update streams in: the
server's memory stays one model, and nothing it holds says anything about one client. At the
end, the round's SecAggRound removes the masks; the sum of n x change and of n is decoded,
checked, and handed to the run's strategy as one aggregate (`FedAvg.add_aggregate`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from fedgrpc.common import secagg as sa
from fedgrpc.common.errors import SecAggError
from fedgrpc.server.aggregate import Weights
from fedgrpc.server.secagg import SecAggRound
from fedgrpc.server.strategy import FedAvg


class SecAggStrategy:
    """Folds masked updates in the ring; the unmasked sum goes to `inner`."""

    def __init__(self, inner: FedAvg) -> None:
        self.inner = inner
        self.name = inner.name
        self.secagg: SecAggRound | None = None  # the open round's, attached by the driver
        self._ring: list[np.ndarray] = []
        self._global: list[np.ndarray] = []
        self._max_updates = 1

    def begin_round(self, global_weights: Sequence[np.ndarray], max_updates: int) -> None:
        self._global = [np.asarray(w) for w in global_weights]
        self._ring = [np.zeros(np.shape(w), np.uint32) for w in self._global] + [np.zeros(1, np.uint32)]
        self._max_updates = max(1, max_updates)

    def bound(self, reference: np.ndarray) -> float:
        return float("inf")  # ring words: every value is valid, and the sum cannot overflow

    def prepare(
        self, tensor: np.ndarray, reference: np.ndarray, num_examples: int, *, in_place: bool
    ) -> np.ndarray:
        if tensor.dtype != np.uint32:
            raise SecAggError(f"a masked update's tensors are uint32 words, got {tensor.dtype}")
        return tensor

    def add(self, update: Sequence[np.ndarray], num_examples: int) -> None:
        for total, part in zip(self._ring, update, strict=True):
            np.add(total, np.asarray(part, np.uint32), out=total)  # wraps around: the ring

    def masked_sum(self) -> list[np.ndarray]:
        """What the server holds before unmasking (uniformly distributed while masks remain)."""
        return self._ring

    def result(self) -> Weights:
        secure = self.secagg
        if secure is None:
            raise RuntimeError("the round's secure aggregation was not attached")
        total = secure.unmask(self._ring)
        self._ring = []
        sums, count = sa.decode(total, secure.scale)
        _check_decoded(sums, count, secure)
        self.inner.begin_round(self._global, self._max_updates)
        self.inner.add_aggregate(sums, count)
        return self.inner.result()

    def state(self) -> dict[str, np.ndarray]:
        return self.inner.state()

    def restore(self, state: dict[str, np.ndarray]) -> None:
        self.inner.restore(state)


def _check_decoded(sums: Sequence[np.ndarray], count: int, secure: SecAggRound) -> None:
    """Honest updates decode to a count of 1..k x max_examples and a mean change within +-bound
    (each client clipped before encoding). Anything else means a client sent ring words that
    were not an encoded update: the round cannot be trusted."""
    spec, k = secure.spec, len(secure.submitted)
    if not 1 <= count <= k * spec.max_examples:
        raise SecAggError(
            f"the unmasked example count is {count}, outside 1..{k * spec.max_examples}: a client "
            "sent a masked update that is not an encoded one"
        )
    slack = spec.bound * 1e-6 + k / (secure.scale * count)  # each client's rounding, at most half a step
    for total in sums:
        if total.size and float(np.max(np.abs(total))) / count > spec.bound + slack:
            raise SecAggError(
                f"the unmasked mean change reaches {float(np.max(np.abs(total))) / count:.3g}, above the "
                f"bound {spec.bound:g} every encoded update keeps to: a client sent a malformed masked update"
            )
