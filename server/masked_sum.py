"""The aggregate under secure aggregation: masked updates summed in the ring, then unmasked.

SecAggStrategy wraps the run's strategy (FedAvg, a server optimizer, DP-FedAvg's noise). While
a round is open it only adds uint32 words, modulo 2^32, as each masked update streams in: the
server's memory stays one model, and nothing it holds says anything about one client. At the
end, the round's SecAggRound removes the masks; the sum of n x change and of n is decoded,
checked, and handed to the run's strategy as one aggregate (`FedAvg.add_aggregate`). The
SecAggRound of the attempt is passed to each call that needs it (`add_from`, `unmasked`, by
fedgrpc.server.round_mode): the strategy holds no round of its own.

When the round's SecAggRound splits its clients into groups, each group has its own ring and
its sum is checked alone: the sums that pass are added into the one aggregate, a group whose
sum is impossible is left out (and its members' updates with it), named in
`SecAggRound.failed` for the driver to narrow down who sent it. Only when every group fails
does the attempt abort. An impossible sum is never taken for a diverging model: it feeds
`isolation` (fedgrpc.server.isolation), which decides the next attempts' groups, excludes the
client it narrows down to, and says when the round is lost instead (fewer than six clients).
Pairs of clients in a share dispute (fedgrpc.server.secagg) are kept in `apart` for the rest of
the run (and in the checkpoint); an attempt that aborted on a new dispute is progress, as one
that narrowed the suspects down: no failure to count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..common import secagg as sa
from ..common.errors import SecAggError
from .aggregate import Weights
from .isolation import Isolation
from .secagg import SecAggRound
from .strategies import MeanStrategy

#: The checkpoint entry that keeps the excluded clients across a restart.
EXCLUDED_KEY = "secagg/excluded"
#: The checkpoint entry that keeps the disputed pairs across a restart (k x 2 client ids).
APART_KEY = "secagg/apart"


class SecAggStrategy:
    """Folds masked updates in the ring; the unmasked sum goes to `inner`."""

    def __init__(self, inner: MeanStrategy) -> None:
        self.inner = inner
        self.name = inner.name
        self._rings: dict[int, list[np.ndarray]] = {}  # group index -> its running sum
        self._global: list[np.ndarray] = []
        self._max_updates = 1
        self.isolation = Isolation()
        self.apart: set[frozenset[int]] = set()  # disputed pairs: never neighbours again
        self.progress = False  # the last attempt narrowed the suspects or found a new dispute (no failure)

    def begin_round(self, global_weights: Sequence[np.ndarray], max_updates: int) -> None:
        self._global = [np.asarray(w) for w in global_weights]
        self._rings = {}
        self._max_updates = max(1, max_updates)
        self.progress = False

    def bound(self, reference: np.ndarray) -> float:
        return float("inf")  # ring words: every value is valid, and the sum cannot overflow

    def prepare(
        self, tensor: np.ndarray, reference: np.ndarray, num_examples: int, *, in_place: bool
    ) -> np.ndarray:
        if tensor.dtype != np.uint32:
            raise SecAggError(f"a masked update's tensors are uint32 words, got {tensor.dtype}")
        return tensor

    def add(self, update: Sequence[np.ndarray], num_examples: int) -> None:
        raise RuntimeError("a masked update is added with add_from: its sender's group picks the ring")

    def add_from(self, secure: SecAggRound, client_id: int, update: Sequence[np.ndarray]) -> None:
        """Add a masked update of attempt `secure` to its sender's group's ring (on the fold thread)."""
        ring = self._rings.get(secure.group_of[client_id])
        if ring is None:
            ring = [np.zeros(np.shape(w), np.uint32) for w in self._global] + [np.zeros(1, np.uint32)]
            self._rings[secure.group_of[client_id]] = ring
        for total, part in zip(ring, update, strict=True):
            np.add(total, np.asarray(part, np.uint32), out=total)  # wraps around: the ring

    def masked_sum(self) -> dict[int, list[np.ndarray]]:
        """What the server holds before unmasking, a ring per group (uniform while masks remain)."""
        return self._rings

    def result(self) -> Weights:
        raise RuntimeError("a masked sum is unmasked with unmasked(secure): its attempt holds the shares")

    def unmasked(self, secure: SecAggRound) -> Weights:
        """The result of attempt `secure`: each group's ring unmasked, checked, and the passing
        sums handed to the run's strategy (SecAggError when none passes or unmasking fails)."""
        self.progress = False
        try:
            totals = secure.unmask(self._rings)
        except SecAggError:
            new = secure.disputes - self.apart
            self.apart |= new
            self.progress = bool(new)  # a pair kept apart from now on: that cannot recur, no failure
            raise
        self._rings = {}
        members = secure.groups_submitted()
        passed: list[tuple[list[np.ndarray], int]] = []
        for index, total in totals.items():
            sums, count = sa.decode(total, secure.scale)
            try:
                _check_decoded(sums, count, secure, len(members[index]))
            except SecAggError as exc:
                secure.failed.append((members[index], str(exc)))
                continue
            passed.append((sums, count))
            secure.counted |= members[index]
        self.progress = self.isolation.observe(secure.number, [group for group, _ in secure.failed])
        if not passed:
            reasons = "; ".join(reason for _, reason in secure.failed)
            raise SecAggError(f"every group's unmasked sum is impossible: {reasons}")
        sums = [np.array(t, np.float64) for t in passed[0][0]]
        for other, _ in passed[1:]:
            for acc, part in zip(sums, other, strict=True):
                acc += part
        self.inner.begin_round(self._global, self._max_updates)
        self.inner.add_aggregate(sums, sum(count for _, count in passed))
        return self.inner.result()

    def state(self) -> dict[str, np.ndarray]:
        state = self.inner.state()
        if self.isolation.excluded:
            state[EXCLUDED_KEY] = np.array(self.isolation.state(), np.int64)
        if self.apart:
            state[APART_KEY] = np.array(sorted(sorted(pair) for pair in self.apart), np.int64)
        return state

    def restore(self, state: dict[str, np.ndarray]) -> None:
        rest = dict(state)
        self.isolation.restore(int(c) for c in rest.pop(EXCLUDED_KEY, np.zeros(0, np.int64)))
        pairs = np.asarray(rest.pop(APART_KEY, np.zeros((0, 2), np.int64)), np.int64).reshape(-1, 2)
        self.apart = {frozenset((int(u), int(v))) for u, v in pairs}
        self.inner.restore(rest)


def _check_decoded(sums: Sequence[np.ndarray], count: int, secure: SecAggRound, k: int) -> None:
    """Honest updates (k of them) decode to a count of 1..k x max_examples and a mean change
    within +-bound (each client clipped before encoding). Anything else means a client sent
    ring words that were not an encoded update: this sum cannot be trusted."""
    spec = secure.spec
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
