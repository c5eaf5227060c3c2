"""Aggregation math as pure functions over lists of numpy arrays (one array per weight tensor)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Weights = list[np.ndarray]


def weighted_mean(updates: Sequence[tuple[Sequence[np.ndarray], int]]) -> Weights:
    """The example-weighted mean of client weights (FedAvg's definition), in float64.

    Each update is (weights, num_examples). The result has the dtypes and shapes of the
    first update; integer tensors are rounded to the nearest value. Keeps nothing between
    calls: the reference that the streaming `WeightedSum` is tested against.
    """
    if not updates:
        raise ValueError("cannot average zero updates")
    for _, num_examples in updates:
        _check_count(num_examples)
    total = sum(n for _, n in updates)
    result: Weights = []
    for index, template in enumerate(updates[0][0]):
        acc = np.zeros(np.shape(template), dtype=np.float64)
        for weights, n in updates:
            acc += np.asarray(weights[index], dtype=np.float64) * n
        result.append(_cast(acc / total, np.asarray(template).dtype))
    return result


def sum_dtype(dtype: np.dtype[np.generic]) -> np.dtype[np.generic]:
    """The dtype a tensor's changes are summed in: float32 for float16/float32 weights (changes
    are small, so float32 keeps them far below one step of the result), float64 otherwise."""
    if dtype in (np.float16, np.float32):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def weighted_change(
    weights: np.ndarray, reference: np.ndarray, num_examples: float, *, in_place: bool = False
) -> np.ndarray:
    """num_examples x (weights - reference) in sum_dtype: the term FedAvg sums for one tensor
    (a mean strategy may weigh an update by another positive number than its examples).

    in_place: overwrite `weights` when its dtype is already the sum dtype (the caller owns it).
    """
    _check_count(num_examples)
    if weights.shape != reference.shape:
        raise ValueError(f"shape {weights.shape} does not match {reference.shape}")
    dtype = sum_dtype(reference.dtype)
    out = weights if in_place and weights.dtype == dtype and weights.flags.writeable else None
    change: np.ndarray = np.subtract(weights, reference, out=out, dtype=dtype)
    change *= change.dtype.type(num_examples)
    return change


class WeightedSum:
    """The running sum of FedAvg: sum of num_examples x (weights - global), O(model) memory.

    Centred on the round's global weights: what is summed is each client's change, which is
    small next to the weights, so a float32 sum (half the memory of float64) keeps the mean
    within a few float32 steps of the change, well below one step of the result in training.
    Folding a change that was weighted beforehand (`add_change`, see `weighted_change`) is one
    in-place `np.add` per tensor: the work per update happens on the thread that received it,
    and the fold, which every update passes through one at a time, stays at memory speed.
    """

    BLOCK = 1 << 16  # elements per step of `add`: a scratch buffer that stays in the CPU cache

    def __init__(self, reference: Sequence[np.ndarray]) -> None:
        self._reference = [np.asarray(r) for r in reference]
        # np.full writes every page now, so the first fold does not pay the page faults.
        self._sums = [np.full(r.shape, 0.0, dtype=sum_dtype(r.dtype)) for r in self._reference]
        self._scratch = {
            dtype: np.empty(min(self.BLOCK, max(s.size for s in self._sums if s.dtype == dtype)), dtype)
            for dtype in {s.dtype for s in self._sums}
        }
        self.total_examples = 0
        self.count = 0

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._sums) + sum(s.nbytes for s in self._scratch.values())

    def add(self, weights: Sequence[np.ndarray], num_examples: int) -> None:
        """Fold in one client's weights (as sent), in cache-sized blocks: no tensor-sized temporary."""
        _check_count(num_examples)
        self._check_shapes(weights)
        for acc, w, g in zip(self._sums, weights, self._reference, strict=True):
            flat_acc, flat_w, flat_g = acc.reshape(-1), np.ascontiguousarray(w).reshape(-1), g.reshape(-1)
            factor = acc.dtype.type(num_examples)
            for start in range(0, flat_w.size, self.BLOCK):
                stop = min(start + self.BLOCK, flat_w.size)
                block = self._scratch[acc.dtype][: stop - start]
                np.subtract(flat_w[start:stop], flat_g[start:stop], out=block, dtype=acc.dtype)
                block *= factor
                np.add(flat_acc[start:stop], block, out=flat_acc[start:stop])
        self._counted(num_examples)

    def add_change(self, changes: Sequence[np.ndarray], num_examples: int) -> None:
        """Fold in `weighted_change` of every tensor of one update (num_examples as given there)."""
        _check_count(num_examples)
        self._check_shapes(changes)
        for acc, change in zip(self._sums, changes, strict=True):
            if change.dtype != acc.dtype:
                raise ValueError(f"a change of dtype {change.dtype} cannot be folded into a {acc.dtype} sum")
            np.add(acc, change, out=acc)
        self._counted(num_examples)

    def mean(self) -> Weights:
        """The weighted mean of what was folded in, with the reference's dtypes; the sum stays."""
        self._check_not_empty()
        return [self._mean_of(acc.copy(), g) for acc, g in zip(self._sums, self._reference, strict=True)]

    def take_mean(self) -> Weights:
        """The mean, computed in the sums' own memory: at the end of a round the server holds
        the sums or the result, never both. The sum is empty afterwards."""
        self._check_not_empty()
        result: Weights = []
        while self._sums:
            result.append(self._mean_of(self._sums.pop(0), self._reference[len(result)]))
        self._reference, self._scratch = [], {}
        self.total_examples, self.count = 0, 0
        return result

    @property
    def reference(self) -> list[np.ndarray]:
        return self._reference

    def take_sum(self) -> Weights:
        """The sums themselves (zeros if nothing was added); this WeightedSum is empty afterwards."""
        sums = self._sums
        self._sums, self._reference, self._scratch = [], [], {}
        self.total_examples, self.count = 0, 0
        return sums

    def take_mean_change(self) -> Weights:
        """The mean change, sum / total examples, in the sums' own memory and dtype (what the
        server optimizers step with); the sum is empty afterwards."""
        self._check_not_empty()
        total = self.total_examples
        changes: Weights = []
        for acc in self._sums:
            acc /= acc.dtype.type(total)
            changes.append(acc)
        self._sums, self._reference, self._scratch = [], [], {}
        self.total_examples, self.count = 0, 0
        return changes

    def _mean_of(self, acc: np.ndarray, reference: np.ndarray) -> np.ndarray:
        acc /= acc.dtype.type(self.total_examples)
        acc += reference
        return _cast(acc, reference.dtype)

    def _check_shapes(self, arrays: Sequence[np.ndarray]) -> None:
        """Every shape, before anything is added. An update staged on disk tells its shapes
        (`shapes`) without being read, so its tensors are read once, by the fold."""
        if len(arrays) != len(self._sums):
            raise ValueError(f"expected {len(self._sums)} tensors, got {len(arrays)}")
        shapes = getattr(arrays, "shapes", None) or [np.shape(a) for a in arrays]
        for acc, shape in zip(self._sums, shapes, strict=True):
            if acc.shape != tuple(shape):
                raise ValueError(f"shape {tuple(shape)} does not match {acc.shape}")

    def _check_not_empty(self) -> None:
        if self.total_examples == 0:
            raise ValueError("no updates were added")

    def _counted(self, num_examples: int) -> None:
        self.total_examples += num_examples
        self.count += 1


def apply_change(
    weights: Sequence[np.ndarray], changes: Sequence[np.ndarray], *, in_place: bool = False
) -> Weights:
    """weights + changes, each in the weights' dtype (integer tensors rounded): the step a mean
    strategy takes. in_place: add into `changes` (the caller owns them; FedAvg's mean change is
    the sum's own memory, so the server then holds the sum or the result, never both)."""
    if len(weights) != len(changes):
        raise ValueError(f"expected {len(weights)} tensors, got {len(changes)}")
    result: Weights = []
    for w, change in zip(weights, changes, strict=True):
        reference = np.asarray(w)
        if in_place and change.flags.writeable and np.can_cast(reference.dtype, change.dtype, "same_kind"):
            change += reference
            result.append(_cast(change, reference.dtype))
        else:
            result.append(
                _cast(np.add(change, reference, dtype=np.result_type(change, reference)), reference.dtype)
            )
    return result


def _check_count(num_examples: float) -> None:
    if num_examples <= 0:
        raise ValueError(f"num_examples must be positive, got {num_examples}")


def _cast(mean: np.ndarray, dtype: np.dtype[np.generic]) -> np.ndarray:
    """A mean back in the weights' dtype; integer and boolean tensors are rounded first."""
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        np.rint(mean, out=mean)
    return mean.astype(dtype, copy=False)


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


# -- server optimizers: a step on the round's mean change, the "pseudo-gradient" ---------------
#
# Reddi et al., "Adaptive Federated Optimization" (2021), Algorithm 2, and Hsu et al. (2019)
# for server momentum. delta is the example-weighted mean of (client weights - global), so
# plain FedAvg is x + delta; each rule below returns the step that replaces delta. One tensor
# at a time, float64 in and out of the state (the state lives in the checkpoint).


def momentum_velocity(velocity: np.ndarray, delta: np.ndarray, beta: float) -> np.ndarray:
    """FedAvgM: v <- beta * v + delta; the step is server_lr * v."""
    result: np.ndarray = beta * velocity + delta
    return result


def first_moment(m: np.ndarray, delta: np.ndarray, beta1: float) -> np.ndarray:
    """m <- beta1 * m + (1 - beta1) * delta (shared by FedAdagrad, FedAdam and FedYogi)."""
    result: np.ndarray = beta1 * m + (1.0 - beta1) * delta
    return result


def adagrad_second_moment(v: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """FedAdagrad: v <- v + delta^2."""
    result: np.ndarray = v + delta * delta
    return result


def adam_second_moment(v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    """FedAdam: v <- beta2 * v + (1 - beta2) * delta^2."""
    result: np.ndarray = beta2 * v + (1.0 - beta2) * delta * delta
    return result


def yogi_second_moment(v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    """FedYogi: v <- v - (1 - beta2) * delta^2 * sign(v - delta^2)."""
    squared = delta * delta
    result: np.ndarray = v - (1.0 - beta2) * squared * np.sign(v - squared)
    return result


def adaptive_step(m: np.ndarray, v: np.ndarray, server_lr: float, tau: float) -> np.ndarray:
    """The adaptive family's step: server_lr * m / (sqrt(v) + tau)."""
    result: np.ndarray = server_lr * m / (np.sqrt(v) + tau)
    return result
