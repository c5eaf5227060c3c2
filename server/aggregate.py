"""Aggregation math as pure functions over lists of numpy arrays (one array per weight tensor)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Weights = list[np.ndarray]


def weighted_mean(updates: Sequence[tuple[Sequence[np.ndarray], int]]) -> Weights:
    """The example-weighted mean of client weights (FedAvg), accumulated in float64.

    Each update is (weights, num_examples). The result has the dtypes and shapes of the
    first update; integer tensors are rounded to the nearest value.
    """
    if not updates:
        raise ValueError("cannot average zero updates")
    total = WeightedSum.like(updates[0][0])
    for weights, num_examples in updates:
        total.add(weights, num_examples)
    return total.mean()


class WeightedSum:
    """A running sum of num_examples * weights in float64: O(model) memory, however many clients.

    Folding updates in one at a time as they arrive gives the same mean as averaging them all
    at the end (to float64 rounding), without keeping every client's weights.
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtypes: Sequence[np.dtype[np.generic]]) -> None:
        self._sums = [np.zeros(shape, dtype=np.float64) for shape in shapes]
        self._dtypes = list(dtypes)
        self.total_examples = 0
        self.count = 0

    @classmethod
    def like(cls, weights: Sequence[np.ndarray]) -> WeightedSum:
        return cls([w.shape for w in weights], [w.dtype for w in weights])

    def add(self, weights: Sequence[np.ndarray], num_examples: int) -> None:
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        if len(weights) != len(self._sums):
            raise ValueError(f"expected {len(self._sums)} tensors, got {len(weights)}")
        for acc, w in zip(self._sums, weights, strict=True):
            if acc.shape != w.shape:
                raise ValueError(f"shape {w.shape} does not match {acc.shape}")
            acc += np.multiply(w, num_examples, dtype=np.float64)  # one tensor-sized temporary
        self.total_examples += num_examples
        self.count += 1

    def mean(self) -> Weights:
        if self.total_examples == 0:
            raise ValueError("no updates were added")
        result = []
        for acc, dtype in zip(self._sums, self._dtypes, strict=True):
            mean = acc / self.total_examples
            if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
                mean = np.rint(mean)
            result.append(mean.astype(dtype))
        return result
