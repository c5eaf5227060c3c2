"""FedAvg's streamed sum, the machinery under every mean strategy (fedgrpc.server.strategies).

One `StreamedMean` lives for one round attempt:

    begin_round --> folding (prepare on receiving threads, add on the fold thread) --> take_mean_change

Each tensor of an update is weighted on the thread that received it (`prepare`: weight x
(tensor - global), in the sum's dtype), so the one fold thread adds it in place (`add`), at
memory speed. Under central DP (DP-FedAvg, McMahan et al. 2018) every update is clipped on the
fold thread and weighs 1, and Gaussian noise is added to the sum at the end. Under secure
aggregation the unmasked sum arrives whole (`add_aggregate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..common.errors import ConfigError
from ..common.privacy import clip_factor, gaussian_noise, l2_norm
from .aggregate import WeightedSum, Weights, sum_dtype, weighted_change


@dataclass(frozen=True)
class CentralDP:
    """DP-FedAvg's server side (fedgrpc.common.privacy): every update clipped to L2 `clip` and
    weighted 1, Gaussian noise of std noise_multiplier * clip added to the sum, which is divided
    by the expected number of updates a round (fixed, so the noise is not scaled by chance)."""

    clip: float
    noise_multiplier: float
    expected_updates: int

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ConfigError(f"--dp-clip must be positive, got {self.clip}")
        if self.noise_multiplier < 0:
            raise ConfigError(f"--dp-noise-multiplier must be >= 0, got {self.noise_multiplier}")


class StreamedMean:
    """One round's running sum of weighted changes, and what is known of the updates in it."""

    def __init__(
        self,
        global_weights: Sequence[np.ndarray],
        max_updates: int,
        privacy: CentralDP | None,
        noise: np.random.Generator | None,
    ) -> None:
        self.sum = WeightedSum(global_weights)
        self.max_updates = max(1, max_updates)
        self.privacy, self._noise = privacy, noise
        self.counts: list[int] = []  # num_examples of every update folded in, in order

    @property
    def reference(self) -> list[np.ndarray]:
        return self.sum.reference

    def bound(self, reference: np.ndarray) -> float:
        """Each weighted change at most max/(2 x updates): the sum of a whole round stays finite,
        and so does the mean plus the global weights unless those are already near the top."""
        return float(np.finfo(sum_dtype(reference.dtype)).max) / (2 * self.max_updates)  # type: ignore[type-var]

    def prepare(
        self, tensor: np.ndarray, reference: np.ndarray, weight: float, *, in_place: bool
    ) -> np.ndarray:
        return weighted_change(
            tensor, reference, 1 if self.privacy is not None else weight, in_place=in_place
        )

    def add(self, update: Sequence[np.ndarray], num_examples: int) -> None:
        if self.privacy is None:
            self.sum.add_change(update, num_examples)
        else:
            floating = [np.asarray(t) for t in update]  # read once (a spooled update reads from disk)
            factor = clip_factor(
                l2_norm([t for t in floating if np.issubdtype(t.dtype, np.floating)]), self.privacy.clip
            )
            for tensor in floating:
                if factor < 1.0 and np.issubdtype(tensor.dtype, np.floating):
                    tensor *= tensor.dtype.type(factor)
            self.sum.add_change(floating, 1)
        self.counts.append(num_examples)

    def add_aggregate(self, sums: Sequence[np.ndarray], total_weight: int) -> None:
        """A sum of weighted changes made elsewhere (secure aggregation unmasks only the sum),
        added as is: under DP the clients clipped before masking, each with weight 1."""
        self.sum.add_change(
            [np.asarray(s).astype(sum_dtype(r.dtype)) for s, r in zip(sums, self.sum.reference, strict=True)],
            total_weight,
        )

    def take_mean_change(self) -> Weights:
        """The round's mean change, in the sum's own memory: sum / examples, or under DP
        (sum + noise) / expected updates. The sum is empty afterwards."""
        if self.privacy is None:
            return self.sum.take_mean_change()
        sums = self.sum.take_sum()
        dp, rng = self.privacy, self._noise
        assert rng is not None
        for total in sums:
            if np.issubdtype(total.dtype, np.floating):
                total += gaussian_noise(total.shape, dp.noise_multiplier * dp.clip, rng, total.dtype)
            total /= total.dtype.type(dp.expected_updates)
        return sums
