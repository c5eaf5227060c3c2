"""Aggregation strategies: small classes over the pure functions of fedgrpc.server.aggregate.

A strategy sees a round's accepted updates one at a time (`add`) and produces the next
global weights (`result`). Streaming strategies keep O(model) memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from fedgrpc.common.errors import ConfigError
from fedgrpc.server.aggregate import WeightedSum, Weights


class Strategy(Protocol):
    name: str

    def begin_round(self, global_weights: Sequence[np.ndarray]) -> None: ...

    def add(self, weights: Sequence[np.ndarray], num_examples: int) -> None: ...

    def result(self) -> Weights: ...


class FedAvg:
    """Example-weighted mean of the clients' weights (McMahan et al., 2017), folded in as updates arrive."""

    name = "fedavg"

    def __init__(self) -> None:
        self._sum: WeightedSum | None = None

    def begin_round(self, global_weights: Sequence[np.ndarray]) -> None:
        self._sum = WeightedSum.like(global_weights)

    def add(self, weights: Sequence[np.ndarray], num_examples: int) -> None:
        if self._sum is None:
            raise RuntimeError("begin_round was not called")
        self._sum.add(weights, num_examples)

    def result(self) -> Weights:
        if self._sum is None:
            raise RuntimeError("begin_round was not called")
        return self._sum.mean()


STRATEGIES: dict[str, type[FedAvg]] = {"fedavg": FedAvg}


def make_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}") from None
