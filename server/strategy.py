"""Aggregation strategies: small classes over the pure functions of fedgrpc.server.aggregate.

A strategy sees a round's accepted updates one at a time and produces the next global
weights (`result`). Each tensor of an update first goes through `prepare`, on the thread that
received it and as soon as it has been checked; `add` then takes the prepared tensors of a
whole update, on the coordinator's one fold thread. FedAvg prepares a tensor into its weighted
change, so its fold is one in-place addition; the robust strategies keep tensors as sent.

What one update may add is bounded (`bound`): FedAvg's prepared values may not exceed the
largest float of the sum divided by twice the updates a round can take, so no sequence of
accepted updates can overflow the sum (`UpdatePreparer` refuses a tensor past the bound).

| strategy       | use it when                                              | memory          |
|----------------|----------------------------------------------------------|-----------------|
| `fedavg`       | clients are trusted (the reference job): weighted mean   | O(model)        |
| `median`       | some clients may send garbage or attacks; robust to < n/2| O(clients x model) |
| `trimmed-mean` | as median, smoother: drops the extremes per coordinate   | O(clients x model) |
| `krum`         | a few clients (f) may be malicious; picks the update(s)  | O(clients x model) |
|                | closest to the others, needs n > f + 2                   |                 |

The robust strategies ignore example counts on purpose: a client that lies about its
weights can lie about its count too. Every built-in strategy is written on the public API a
user's strategy is (fedgrpc.server.strategies: MeanStrategy or UpdatesStrategy); `--strategy`
loads a user's from a file, module:attribute or entry point (fedgrpc.server.strategy_loader).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..common.codec import TensorSpec
from ..common.config import RunSpec
from ..common.errors import ConfigError, UpdateRejectedError
from .aggregate import Weights
from .mean_fold import CentralDP as CentralDP  # re-exported: callers found it here
from .robust import Krum, Median, TrimmedMean
from .strategies import MeanStrategy, UpdatesStrategy
from .strategy_loader import check_spec, load_strategy


class Strategy(Protocol):
    name: str

    def begin_round(self, global_weights: Sequence[np.ndarray], max_updates: int) -> None:
        """A new round from these weights, which takes at most `max_updates` updates."""
        ...

    def bound(self, reference: np.ndarray) -> float:
        """The largest magnitude a prepared value of this tensor may have (inf: finite is enough)."""
        ...

    def prepare(
        self, tensor: np.ndarray, reference: np.ndarray, num_examples: int, *, in_place: bool
    ) -> np.ndarray:
        """One checked tensor as `add` wants it; in_place: the caller owns `tensor`."""
        ...

    def add(self, update: Sequence[np.ndarray], num_examples: int) -> None:
        """One accepted update, every tensor of it prepared."""
        ...

    def result(self) -> Weights: ...

    def state(self) -> dict[str, np.ndarray]:
        """What the strategy carries from round to round (for the checkpoint); {} if nothing."""
        ...

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Take up the state a checkpoint saved."""
        ...


def add_update(
    strategy: Strategy, update: Sequence[np.ndarray], reference: Sequence[np.ndarray], num_examples: int
) -> None:
    """Prepare and add one update that the caller keeps (none of its arrays is overwritten)."""
    prepared = [
        strategy.prepare(t, g, num_examples, in_place=False) for t, g in zip(update, reference, strict=True)
    ]
    strategy.add(prepared, num_examples)


class UpdatePreparer:
    """Prepares the tensors of one update for its strategy and refuses any past the bound.

    Called with each decoded tensor on the thread that received it. Remembers the largest
    prepared magnitude, which names the suspects if a round ever goes wrong. `keep_as_sent`
    (updates being recorded): the tensor is checked through a prepared copy and kept as sent.
    """

    def __init__(
        self,
        strategy: Strategy,
        specs: Sequence[TensorSpec],
        reference: Sequence[np.ndarray],
        num_examples: int,
        *,
        keep_as_sent: bool = False,
    ) -> None:
        self._strategy = strategy
        self._specs = specs
        self._reference = reference
        self._num_examples = num_examples
        self._keep_as_sent = keep_as_sent
        self.largest = 0.0

    def __call__(self, index: int, tensor: np.ndarray) -> np.ndarray:
        reference = self._reference[index]
        with np.errstate(over="ignore", invalid="ignore"):  # caught just below, with a message
            prepared = self._strategy.prepare(
                tensor, reference, self._num_examples, in_place=not self._keep_as_sent
            )
        largest = _largest_magnitude(prepared)
        bound = self._strategy.bound(reference)
        if not largest <= bound:  # NaN fails this comparison too
            name = self._specs[index].name
            if not math.isfinite(largest):
                raise UpdateRejectedError(
                    f"tensor {name!r} holds NaN or infinite values, or values so large that "
                    "num_examples times their change overflows"
                )
            raise UpdateRejectedError(
                f"tensor {name!r} changes by up to {largest:.3g} (weighted by num_examples), above "
                f"this round's bound of {bound:.3g}: such an update could overflow the aggregate"
            )
        self.largest = max(self.largest, largest)
        return tensor if self._keep_as_sent else prepared


def _largest_magnitude(array: np.ndarray) -> float:
    """max |x| in two reductions without a temporary array; NaN or inf if there is any."""
    if array.size == 0 or not np.issubdtype(array.dtype, np.number):
        return 0.0
    if not np.issubdtype(array.dtype, np.floating):
        return float(max(abs(int(array.max())), abs(int(array.min()))))
    return max(abs(float(array.max())), abs(float(array.min())))


class FedAvg(MeanStrategy):
    """Example-weighted mean of the clients' weights (McMahan et al., 2017), folded in as updates
    arrive; with `privacy`, DP-FedAvg (McMahan et al., 2018) instead. MeanStrategy as it is."""

    name = "fedavg"

    def __init__(self, privacy: CentralDP | None = None) -> None:
        self.use_privacy(privacy)

    def _mean_change(self) -> Weights:
        """The round's mean change alone (DP's noise in it), ending the round: for subclasses
        written against FedAvg before MeanStrategy.step existed, which override `result`."""
        fold, self._fold = self._round(), None
        return fold.take_mean_change()


ROBUST = ("median", "trimmed-mean", "krum")
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi", *ROBUST, "scaffold")
DEFAULT_PROXIMAL_MU = 0.01


@dataclass(frozen=True)
class StrategySettings:
    """`--strategy` and its parameters. None: the strategy's own default.

    fedprox is FedAvg on the server with a proximal term mu/2 ||w - w_global||^2 in every
    client's loss (`proximal_mu`, which travels in the run spec); any strategy may add it.
    """

    name: str = "fedavg"
    trim_fraction: float = 0.2  # trimmed-mean
    byzantine: int = 1  # krum
    server_lr: float | None = None
    server_momentum: float | None = None  # fedavgm's momentum, the adaptive family's beta1
    server_beta2: float | None = None
    server_tau: float | None = None
    proximal_mu: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError(f"--strategy is empty; choose from {', '.join(STRATEGIES)}, or give your own")
        if not self.built_in:
            check_spec(self.name)
        given = [flag for flag, value in self._server_flags() if value is not None]
        if given and self.name not in _SERVER_OPTIMIZER_NAMES:
            raise ConfigError(
                f"{', '.join(given)} set a server optimizer, which --strategy {self.name} does not have; "
                f"use one of {', '.join(_SERVER_OPTIMIZER_NAMES)}"
            )
        if self.name == "fedavgm" and (self.server_beta2 is not None or self.server_tau is not None):
            raise ConfigError("--server-beta2 and --server-tau belong to fedadagrad, fedadam and fedyogi")
        if self.proximal_mu is not None and self.proximal_mu < 0:
            raise ConfigError(f"--proximal-mu must be >= 0, got {self.proximal_mu}")

    @property
    def built_in(self) -> bool:
        """A strategy fedgrpc has; otherwise a file, module:attribute or entry point to load."""
        return self.name in STRATEGIES

    @property
    def client_proximal_mu(self) -> float:
        """The mu clients add to their loss (0: none)."""
        if self.proximal_mu is not None:
            return self.proximal_mu
        return DEFAULT_PROXIMAL_MU if self.name == "fedprox" else 0.0

    def _server_flags(self) -> list[tuple[str, float | None]]:
        return [
            ("--server-lr", self.server_lr),
            ("--server-momentum", self.server_momentum),
            ("--server-beta2", self.server_beta2),
            ("--server-tau", self.server_tau),
        ]


_SERVER_OPTIMIZER_NAMES = ("fedavgm", "fedadagrad", "fedadam", "fedyogi")


def make_strategy(settings: StrategySettings, privacy: CentralDP | None = None) -> Strategy:
    """The strategy --strategy names (a built-in one, or the user's, loaded), central DP around
    it; ConfigError for a combination that cannot work."""
    built = _built_in(settings) if settings.built_in else load_strategy(settings.name)
    if privacy is not None:
        if built.takes_tensors:
            raise ConfigError(
                f"--strategy {settings.name} cannot take differential privacy: the tensors each update "
                "carries for it would travel unclipped and unnoised; leave --dp-clip off"
            )
        if not isinstance(built, MeanStrategy):
            raise ConfigError(
                f"differential privacy needs a mean to add its noise to: --strategy {settings.name} "
                "cannot take it; use fedavg, fedprox or a server optimizer"
            )
        if not built.weighs_by_examples:
            raise ConfigError(
                f"differential privacy weighs every update 1: --strategy {settings.name} weighs "
                "updates its own way (it defines weight), so the two cannot be combined"
            )
        built.use_privacy(privacy)
    return built


def _built_in(settings: StrategySettings) -> MeanStrategy | UpdatesStrategy:
    name = settings.name
    if name in ("fedavg", "fedprox"):
        return FedAvg()
    if name == "median":
        return Median()
    if name == "trimmed-mean":
        return TrimmedMean(settings.trim_fraction)
    if name == "krum":
        return Krum(settings.byzantine)
    if name == "scaffold":
        from .scaffold import Scaffold

        return Scaffold()
    from .fedopt import SERVER_OPTIMIZERS

    options = {
        key: value
        for key, value in (
            ("server_lr", settings.server_lr),
            ("momentum" if name == "fedavgm" else "beta1", settings.server_momentum),
            ("beta2", settings.server_beta2),
            ("tau", settings.server_tau),
        )
        if value is not None
    }
    return SERVER_OPTIMIZERS[name](**options)


def configure(strategy: Strategy, run: RunSpec) -> None:
    """Tell the run's strategy (under secure aggregation, the one inside) its RunSpec."""
    built = getattr(strategy, "inner", strategy)
    if isinstance(built, MeanStrategy | UpdatesStrategy):
        built.configure(run)


def secure_refusal(strategy: Strategy) -> str | None:
    """Why this strategy cannot run under secure aggregation (which shows only the sum); None: it can."""
    if isinstance(strategy, MeanStrategy | UpdatesStrategy) and strategy.takes_tensors:
        return "the masked sum carries the model's tensors only, not those each update carries for it"
    if isinstance(strategy, MeanStrategy):
        return None if strategy.weighs_by_examples else "it weighs updates its own way"
    if type(strategy) in (Median, TrimmedMean, Krum):
        return "a robust rule needs every update"
    return "it needs every update"


def strategy_record(settings: StrategySettings, strategy: object) -> dict[str, str | float | int]:
    """The strategy a run aggregates with and the parameters it works with, defaults filled in
    (`strategy` is what make_strategy built): for the start-up log, history.json and the dashboard.
    A user's strategy: its name, where it came from and the SHA-256 of its file."""
    built = getattr(strategy, "inner", strategy)  # under secure aggregation, the FedAvg inside
    origin = getattr(built, "origin", None)
    if isinstance(built, MeanStrategy | UpdatesStrategy) and origin is not None:
        return {"name": built.name, "source": origin.source, "digest": origin.digest}
    record: dict[str, str | float | int] = {"name": settings.name}
    for name in ("server_lr", "momentum", "beta1", "beta2", "tau"):
        if isinstance(getattr(built, name, None), float | int):
            record[name] = getattr(built, name)
    if settings.name == "trimmed-mean":
        record["trim_fraction"] = settings.trim_fraction
    if settings.name == "krum":
        record["byzantine"] = settings.byzantine
    if settings.client_proximal_mu:
        record["proximal_mu"] = settings.client_proximal_mu
    return record
