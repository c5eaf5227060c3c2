"""How much a stale update counts under FedBuff: the weight w(s) of an update s versions stale.

s = (the version the update is aggregated into) - (the version its client trained from). The
aggregate of a buffer of K updates is sum_i n_i w(s_i) delta_i / sum_i n_i, so a stale update
moves the model less (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous
Aggregation", section 3: w(s) = 1/sqrt(1+s) by default):

    sqrt         1 / sqrt(1 + s)                 the paper's default
    constant     1
    polynomial   (1 + s)^-a                      a = 0.5 is sqrt
    hinge        1 if s <= b, else 1 / (1 + a (s - b))   (Xie et al. 2019, FedAsync)

Every weight lies in (0, 1] and w(0) = 1: a fresh update counts in full, and no weight can
raise an update's sensitivity under DP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..common.errors import ConfigError

MODES = ("sync", "fedbuff")
STALENESS_WEIGHTS = ("sqrt", "constant", "polynomial", "hinge")


@dataclass(frozen=True)
class StalenessWeight:
    """One of STALENESS_WEIGHTS with its parameters (`a`: polynomial's exponent, hinge's slope;
    `b`: hinge's knee)."""

    kind: str = "sqrt"
    a: float = 0.5
    b: int = 4

    def __post_init__(self) -> None:
        if self.kind not in STALENESS_WEIGHTS:
            raise ConfigError(
                f"unknown --staleness-weight {self.kind!r}; choose from {', '.join(STALENESS_WEIGHTS)}"
            )
        if not (math.isfinite(self.a) and self.a >= 0):
            raise ConfigError(f"--staleness-a must be a finite number >= 0, got {self.a}")
        if self.b < 0:
            raise ConfigError(f"--staleness-b must be >= 0, got {self.b}")

    def __call__(self, staleness: int) -> float:
        if staleness < 0:
            raise ValueError(f"staleness is never negative, got {staleness}")
        s = float(staleness)
        if self.kind == "sqrt":
            return 1.0 / math.sqrt(1.0 + s)
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float((1.0 + s) ** -self.a)
        return 1.0 if staleness <= self.b else 1.0 / (1.0 + self.a * (s - self.b))

    def describe(self) -> str:
        """'1/sqrt(1+s)', '(1+s)^-0.3': for the start-up log."""
        return {
            "sqrt": "1/sqrt(1+s)",
            "constant": "1",
            "polynomial": f"(1+s)^-{self.a:g}",
            "hinge": f"1 up to s={self.b}, then 1/(1+{self.a:g}(s-{self.b}))",
        }[self.kind]
