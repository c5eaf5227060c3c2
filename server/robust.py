"""The robust strategies: they keep a round's updates as sent and apply a rule to all of them
at once (fedgrpc.server.aggregate: coordinate median, trimmed mean, Krum), written on the public
UpdatesStrategy (fedgrpc.server.strategies). They ignore example counts on purpose: a client
that lies about its weights can lie about its count too. Memory is O(clients x model), against
FedAvg's O(model)."""

from __future__ import annotations

from collections.abc import Sequence

from ..common.errors import ConfigError
from .aggregate import Weights, coordinate_median, krum, trimmed_mean
from .strategies import Update, UpdatesStrategy


class Median(UpdatesStrategy):
    name = "median"

    def aggregate(self, weights: Weights, updates: Sequence[Update]) -> Weights:
        return coordinate_median([u.weights for u in updates])


class TrimmedMean(UpdatesStrategy):
    name = "trimmed-mean"

    def __init__(self, trim_fraction: float = 0.2) -> None:
        if not 0 <= trim_fraction < 0.5:
            raise ConfigError(f"--trim-fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    def aggregate(self, weights: Weights, updates: Sequence[Update]) -> Weights:
        return trimmed_mean([u.weights for u in updates], self.trim_fraction)


class Krum(UpdatesStrategy):
    name = "krum"

    def __init__(self, num_byzantine: int = 1) -> None:
        if num_byzantine < 0:
            raise ConfigError(f"--byzantine must be >= 0, got {num_byzantine}")
        self.num_byzantine = num_byzantine

    def aggregate(self, weights: Weights, updates: Sequence[Update]) -> Weights:
        return krum([u.weights for u in updates], self.num_byzantine)
