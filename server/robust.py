"""The robust strategies: they keep a round's updates as sent and apply a rule to all of them
at once (fedgrpc.server.aggregate: coordinate median, trimmed mean, Krum). They ignore example
counts on purpose: a client that lies about its weights can lie about its count too. Memory is
O(clients x model), against FedAvg's O(model)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from ..common.errors import ConfigError
from .aggregate import Weights, coordinate_median, krum, trimmed_mean


def no_state(name: str, state: dict[str, np.ndarray]) -> None:
    """A strategy without server state refuses a checkpoint that holds some."""
    if state:
        raise ConfigError(f"the checkpoint holds server optimizer state, but --strategy {name} keeps none")


class _AllUpdates:
    """Keeps the round's updates, then applies a robust rule to all of them at once."""

    name = ""

    def __init__(self, rule: Callable[[Sequence[Sequence[np.ndarray]]], Weights]) -> None:
        self._rule = rule
        self._updates: list[Sequence[np.ndarray]] = []

    def begin_round(self, global_weights: Sequence[np.ndarray], max_updates: int) -> None:
        self._updates = []

    def bound(self, reference: np.ndarray) -> float:
        """Finite is enough: medians, trimmed means and Krum's choice stay within the inputs."""
        return math.inf

    def prepare(
        self, tensor: np.ndarray, reference: np.ndarray, num_examples: int, *, in_place: bool
    ) -> np.ndarray:
        return tensor

    def add(self, update: Sequence[np.ndarray], num_examples: int) -> None:
        # Read into memory now: an update staged on disk is deleted once it has been added.
        self._updates.append([np.asarray(t) for t in update])

    def result(self) -> Weights:
        return self._rule(self._updates)

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        no_state(self.name, state)


class Median(_AllUpdates):
    name = "median"

    def __init__(self) -> None:
        super().__init__(coordinate_median)


class TrimmedMean(_AllUpdates):
    name = "trimmed-mean"

    def __init__(self, trim_fraction: float = 0.2) -> None:
        if not 0 <= trim_fraction < 0.5:
            raise ConfigError(f"--trim-fraction must be in [0, 0.5), got {trim_fraction}")
        super().__init__(lambda updates: trimmed_mean(updates, trim_fraction))


class Krum(_AllUpdates):
    name = "krum"

    def __init__(self, num_byzantine: int = 1) -> None:
        if num_byzantine < 0:
            raise ConfigError(f"--byzantine must be >= 0, got {num_byzantine}")
        super().__init__(lambda updates: krum(updates, num_byzantine))
