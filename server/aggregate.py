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
    at the end (to float64 rounding), without keeping every client's weights. The fold runs in
    blocks through one small float64 scratch buffer, so it never allocates a tensor-sized
    temporary and stays close to the speed of a bare in-place `np.add`.
    """

    BLOCK = 1 << 18  # elements per step: a 2 MiB scratch buffer, big enough to amortise numpy calls

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtypes: Sequence[np.dtype[np.generic]]) -> None:
        # np.full writes every page now, so the first fold does not pay the page faults.
        self._sums = [np.full(shape, 0.0, dtype=np.float64) for shape in shapes]
        self._dtypes = list(dtypes)
        self._scratch = np.empty(min(self.BLOCK, max((s.size for s in self._sums), default=0)))
        self.total_examples = 0
        self.count = 0

    @classmethod
    def like(cls, weights: Sequence[np.ndarray]) -> WeightedSum:
        return cls([w.shape for w in weights], [w.dtype for w in weights])

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._sums) + self._scratch.nbytes

    def add(self, weights: Sequence[np.ndarray], num_examples: int) -> None:
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        if len(weights) != len(self._sums):
            raise ValueError(f"expected {len(self._sums)} tensors, got {len(weights)}")
        for acc, w in zip(self._sums, weights, strict=True):
            if acc.shape != w.shape:
                raise ValueError(f"shape {w.shape} does not match {acc.shape}")
        factor = float(num_examples)
        for acc, w in zip(self._sums, weights, strict=True):
            flat_acc, flat_w = acc.reshape(-1), np.ascontiguousarray(w).reshape(-1)
            for start in range(0, flat_w.size, self.BLOCK):
                stop = min(start + self.BLOCK, flat_w.size)
                scratch = self._scratch[: stop - start]
                np.copyto(scratch, flat_w[start:stop])  # widen to float64: exact
                scratch *= factor  # exact: a float32 value times an integer below 2**29 fits 53 bits
                np.add(flat_acc[start:stop], scratch, out=flat_acc[start:stop])
        self.total_examples += num_examples
        self.count += 1

    def mean(self) -> Weights:
        if self.total_examples == 0:
            raise ValueError("no updates were added")
        return [self._mean_of(acc, dtype) for acc, dtype in zip(self._sums, self._dtypes, strict=True)]

    def take_mean(self) -> Weights:
        """The mean, freeing each float64 sum as soon as its tensor is converted: at the end of
        a round the server holds the sums or the result, not both. The sum is empty afterwards."""
        if self.total_examples == 0:
            raise ValueError("no updates were added")
        result: Weights = []
        while self._sums:
            acc = self._sums.pop(0)
            result.append(self._mean_of(acc, self._dtypes[len(result)], in_place=True))
            del acc
        self.total_examples, self.count = 0, 0
        return result

    def _mean_of(self, acc: np.ndarray, dtype: np.dtype[np.generic], *, in_place: bool = False) -> np.ndarray:
        mean: np.ndarray = np.divide(acc, self.total_examples, out=acc if in_place else None)
        if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            np.rint(mean, out=mean)
        return mean.astype(dtype)


def _stack(updates: Sequence[Sequence[np.ndarray]], index: int) -> np.ndarray:
    return np.stack([np.asarray(u[index], dtype=np.float64) for u in updates])


def _like(result: list[np.ndarray], template: Sequence[np.ndarray]) -> Weights:
    return [r.astype(t.dtype) for r, t in zip(result, template, strict=True)]


def coordinate_median(updates: Sequence[Sequence[np.ndarray]]) -> Weights:
    """Element-wise median of the clients' weights (Yin et al., 2018): no example weighting,
    since a client that lies about its weights can lie about its count too."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    return _like([np.median(_stack(updates, i), axis=0) for i in range(len(updates[0]))], updates[0])


def trimmed_mean(updates: Sequence[Sequence[np.ndarray]], trim_fraction: float) -> Weights:
    """Element-wise mean after dropping the `trim_fraction` largest and smallest values of each
    coordinate (Yin et al., 2018)."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    k = int(trim_fraction * len(updates))
    result = []
    for i in range(len(updates[0])):
        ordered = np.sort(_stack(updates, i), axis=0)
        result.append(ordered[k : len(updates) - k].mean(axis=0))
    return _like(result, updates[0])


def krum(updates: Sequence[Sequence[np.ndarray]], num_byzantine: int, num_selected: int = 1) -> Weights:
    """(Multi-)Krum (Blanchard et al., 2017): score each update by its summed squared distance to
    its n - f - 2 nearest neighbours and average the `num_selected` best-scored ones."""
    n = len(updates)
    if n == 0:
        raise ValueError("cannot aggregate zero updates")
    neighbours = n - num_byzantine - 2
    if neighbours < 1:
        raise ValueError(f"krum needs more than f + 2 updates: {n} updates, f = {num_byzantine}")
    flat = np.stack([np.concatenate([np.ravel(np.asarray(w, dtype=np.float64)) for w in u]) for u in updates])
    squared = np.sum(flat * flat, axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2 * flat @ flat.T, 0.0)
    scores = np.array([np.sort(np.delete(row, i))[:neighbours].sum() for i, row in enumerate(distances)])
    chosen = np.argsort(scores, kind="stable")[: max(1, num_selected)]
    result = [
        np.mean([np.asarray(updates[c][i], dtype=np.float64) for c in chosen], axis=0)
        for i in range(len(updates[0]))
    ]
    return _like(result, updates[0])
