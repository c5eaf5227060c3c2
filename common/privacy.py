"""Differential privacy for federated averaging: clipping, Gaussian noise, and the privacy spent.

DP-FedAvg (McMahan et al. 2018) bounds what any one client can change, then hides it in noise:

- each client's update (its change from the round's global weights) is clipped to L2 norm
  `clip`, on the client (so it works under secure aggregation) or on the server;
- the server sums the clipped changes with weight 1 each (not by example counts, which would
  let one client outweigh the bound), adds Gaussian noise of standard deviation
  `noise_multiplier * clip` to the sum, and divides by the expected number of clients;
- an accountant (Google's dp-accounting, Renyi DP) turns (noise multiplier, sampling, rounds)
  into the epsilon spent for a given delta.

Local DP (a client that trusts nobody to add noise) clips and noises its own update the same
way before it leaves, and accounts for it alone. These are pure functions, shared by server and
client, and tested against their definitions.
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

#: Renyi orders the accountant tries: whole numbers (fractional ones need numerical series that
#: the library reports as failing to converge for small sampling rates).
RDP_ORDERS = tuple(range(2, 257))


def l2_norm(arrays: Sequence[np.ndarray]) -> float:
    """The L2 norm of several tensors taken as one vector, in float64."""
    return math.sqrt(
        sum(float(np.vdot(a.astype(np.float64).ravel(), a.astype(np.float64).ravel())) for a in arrays)
    )


def clip_factor(norm: float, clip: float) -> float:
    """What to multiply an update of L2 norm `norm` by so that it is at most `clip`."""
    return 1.0 if norm <= clip else clip / norm


def clip_change(changes: Sequence[np.ndarray], clip: float) -> list[np.ndarray]:
    """The changes scaled, as one vector, to L2 norm at most `clip` (new arrays)."""
    factor = clip_factor(l2_norm(changes), clip)
    return [np.asarray(c * factor, dtype=c.dtype) for c in changes]


def clip_update(
    weights: Sequence[np.ndarray], reference: Sequence[np.ndarray], clip: float
) -> list[np.ndarray]:
    """The weights of an update whose change from `reference` (its float tensors, as one vector)
    is clipped to L2 norm `clip`: what a client sends under DP-FedAvg's client clipping."""
    changes = [
        np.asarray(w, np.float64) - np.asarray(g, np.float64) for w, g in zip(weights, reference, strict=True)
    ]
    floating = [np.issubdtype(np.asarray(w).dtype, np.floating) for w in weights]
    factor = clip_factor(l2_norm([c for c, f in zip(changes, floating, strict=True) if f]), clip)
    return [
        (np.asarray(g, np.float64) + c * factor).astype(np.asarray(w).dtype) if f else w
        for w, g, c, f in zip(weights, reference, changes, floating, strict=True)
    ]


def noise_generator() -> np.random.Generator:
    """A generator seeded from the operating system's CSPRNG: noise nobody can predict."""
    return np.random.default_rng(secrets.randbits(128))


def gaussian_noise(
    shape: tuple[int, ...], std: float, rng: np.random.Generator, dtype: np.dtype[np.generic]
) -> np.ndarray:
    return rng.normal(0.0, std, size=shape).astype(dtype)


def privatize_locally(
    weights: Sequence[np.ndarray], reference: Sequence[np.ndarray], clip: float, noise_multiplier: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:  # fmt: skip
    """Local DP: reference + clip(weights - reference) + N(0, (noise_multiplier * clip)^2), for the
    float tensors; others as they are."""
    floating = [i for i, w in enumerate(weights) if np.issubdtype(np.asarray(w).dtype, np.floating)]
    changes = [np.asarray(weights[i], np.float64) - np.asarray(reference[i], np.float64) for i in floating]
    clipped = clip_change(changes, clip)
    out = [np.array(w) for w in weights]
    for i, change in zip(floating, clipped, strict=True):
        noised = change + rng.normal(0.0, noise_multiplier * clip, size=change.shape)
        out[i] = (np.asarray(reference[i], np.float64) + noised).astype(np.asarray(weights[i]).dtype)
    return out


@dataclass(frozen=True)
class PrivacyAccountant:
    """Epsilon spent after some rounds of the Gaussian mechanism on sampled clients.

    `sampling`: "all" (every client every round), "fixed" (a sample of `per_round` of
    `population` clients, without replacement: replace-one neighbouring) or "poisson" (each
    client with probability per_round/population: add-or-remove-one).
    """

    noise_multiplier: float
    delta: float
    sampling: str = "all"
    population: int = 1
    per_round: int = 1

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ConfigError(
                f"the noise multiplier must be positive to account privacy, got {self.noise_multiplier}"
            )
        if not 0 < self.delta < 1:
            raise ConfigError(f"--dp-delta must be in (0, 1), got {self.delta}")
        if self.sampling not in ("all", "fixed", "poisson"):
            raise ConfigError(f"unknown client sampling {self.sampling!r}: all, fixed or poisson")

    def epsilon(self, rounds: int) -> float:
        """Epsilon (for this accountant's delta) after `rounds` rounds."""
        if rounds <= 0:
            return 0.0
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        orders, per_round = self._one_round
        return float(compute_epsilon(orders, [rounds * r for r in per_round], self.delta)[0])

    @functools.cached_property
    def _one_round(self) -> tuple[list[float], list[float]]:
        """The RDP of one round at each order, computed once: composing k rounds multiplies it
        by k (what RdpAccountant.compose does), and sampling without replacement costs seconds."""
        import dp_accounting
        from dp_accounting import rdp

        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        event: dp_accounting.DpEvent = gaussian
        if self.sampling == "poisson" and self.per_round < self.population:
            event = dp_accounting.PoissonSampledDpEvent(self.per_round / self.population, gaussian)
        elif self.sampling == "fixed" and self.per_round < self.population:
            relation = dp_accounting.NeighboringRelation.REPLACE_ONE
            event = dp_accounting.SampledWithoutReplacementDpEvent(self.population, self.per_round, gaussian)
        accountant = rdp.RdpAccountant(list(RDP_ORDERS), neighboring_relation=relation)
        accountant.compose(event, 1)
        return list(accountant.orders), [float(r) for r in accountant.rdp]

    def rounds_within(self, target_epsilon: float, limit: int) -> int:
        """The most rounds (up to `limit`) whose epsilon stays within `target_epsilon`."""
        low, high = 0, limit
        while low < high:  # epsilon grows with rounds: bisect
            middle = (low + high + 1) // 2
            if self.epsilon(middle) <= target_epsilon:
                low = middle
            else:
                high = middle - 1
        return low
