"""Which clients train a round and which evaluate it: seeded samples of the ready clients.

Every draw is seeded by (seed, round), so a restarted server draws the same clients again.
With `clients_per_round` K, "fixed" draws K of the ready clients (fewer if fewer are ready),
"poisson" takes each client on its own with probability K/N (a round may sample none);
without K every enrolled client trains.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from ..common.config import check_clients_per_round

SAMPLINGS = ("fixed", "poisson")


@dataclass(frozen=True)
class ClientSampler:
    num_clients: int
    clients_per_round: int | None = None  # None: every enrolled client trains every round
    sampling: str = "fixed"
    seed: int = 0

    def __post_init__(self) -> None:
        check_clients_per_round(self.clients_per_round, self.num_clients)
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be fixed or poisson, got {self.sampling!r}")

    def trainers(self, number: int, ready: Iterable[int]) -> frozenset[int] | None:
        """The clients that train round `number` (None: every enrolled client)."""
        if self.clients_per_round is None:
            return None
        pool = sorted(ready)
        rng = random.Random(f"{self.seed}:{number}")
        if self.sampling == "poisson":  # each client on its own, with probability K/N: may be none
            rate = self.clients_per_round / self.num_clients
            return frozenset(client for client in pool if rng.random() < rate)
        return frozenset(rng.sample(pool, min(self.clients_per_round, len(pool))))

    def evaluators(self, number: int, ready: Iterable[int], fraction: float) -> frozenset[int]:
        """A `fraction` of the ready clients (at least one, if any) to evaluate round `number`'s model."""
        pool = sorted(ready)
        size = max(1, round(fraction * len(pool))) if pool else 0
        return frozenset(random.Random(f"evaluate:{self.seed}:{number}").sample(pool, size))
