"""Write your own aggregation strategy: one small class, loaded like a task.

A strategy turns a round's updates into the next global weights. It is one of two kinds:

- `MeanStrategy` works over FedAvg's streamed sum: the server folds each update into one
  running sum as it arrives (O(model) memory) and hands the strategy the round's mean change
  in `step`. Cheap, and it composes with compression, `--spool-dir`, central DP and secure
  aggregation (which shows the server only the sum). Override `step` (what to do with the
  mean change: FedAvg adds it, FedAdam takes an optimizer step) and, if an update should
  weigh something else than its example count, `weight` (then secure aggregation and central
  DP, which fix the weights themselves, are refused).
- `UpdatesStrategy` keeps each of the round's updates and hands all of them to `aggregate`:
  for rules that need every update (median, Krum). O(clients x model) memory.

Both may keep state from round to round: `state()` returns it as a dict of numpy arrays
(written with every checkpoint, no pickle) and `restore(state)` takes it back when a killed
server resumes, so the run goes on as if it had never stopped. `round_settings(round)` returns
the settings clients get for a round ({} by default). Before the first round the server sets
`self.run`, the run's RunSpec (batch_size, local_epochs, rounds, num_clients, ...).

A strategy may also exchange tensors of its own beside the weights (SCAFFOLD's control
variates, fedgrpc.server.scaffold): `train_tensors()` returns those every client receives with
its TRAIN, and `update_tensors(model)` names those every update must list after the model's.
A MeanStrategy gets their round's mean in `step`'s `round.extras` (summed as the model's
changes are, from zero); an UpdatesStrategy gets each update's in `Update.extras`. Secure
aggregation (which unmasks the model's sum only), central DP (which would leave them
unclipped) and --mode fedbuff refuse such a strategy.

Give it to the server as a file that assigns an instance to `strategy`
(`fl-server --strategy my_strategy.py`), as `package.module:attribute`, or as the name of an
entry point in the `fedgrpc.strategies` group. Its name and the SHA-256 of the file that
defines it are recorded in history.json, the start-up log and the dashboard; a server resuming
a run refuses a strategy whose file changed since. See docs/strategies.md.

The other methods (begin_round, bound, prepare, add, result) are the server's side of the
class (fedgrpc.server.strategy.Strategy): a strategy does not override them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from ..common.codec import TensorSpec
from ..common.config import RunSpec
from ..common.errors import ConfigError
from ..common.privacy import noise_generator
from .aggregate import (
    Weights,
    adagrad_second_moment,
    adam_second_moment,
    adaptive_step,
    apply_change,
    coordinate_median,
    first_moment,
    krum,
    momentum_velocity,
    trimmed_mean,
    weighted_mean,
    yogi_second_moment,
)
from .mean_fold import CentralDP, StreamedMean

__all__ = [
    "ENTRY_POINT_GROUP",
    "MeanStrategy",
    "RoundTotals",
    "RunSpec",
    "TensorSpec",
    "Update",
    "UpdatesStrategy",
    "Weights",
    "adagrad_second_moment",
    "adam_second_moment",
    "adaptive_step",
    "apply_change",
    "coordinate_median",
    "first_moment",
    "krum",
    "momentum_velocity",
    "trimmed_mean",
    "weighted_mean",
    "yogi_second_moment",
]

#: The entry-point group installed strategies are found in (`--strategy NAME`).
ENTRY_POINT_GROUP = "fedgrpc.strategies"


class Update(NamedTuple):
    """One client's update as sent: its weights, the examples it trained on, and the tensors
    the strategy's `update_tensors` asked for, by name."""

    weights: Weights
    num_examples: int
    extras: Mapping[str, np.ndarray] = MappingProxyType({})


@dataclass(frozen=True)
class RoundTotals:
    """What a mean strategy knows of the updates behind a round's mean change."""

    examples: int  # the examples of every update in the sum (under central DP too)
    counts: tuple[int, ...]  # each update's num_examples, in fold order; () under secure aggregation
    # each of `update_tensors`' tensors by name: sum_i weight(n_i) * tensor_i / examples
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Origin:
    """Where a user's strategy came from: what a resumed run checks it against."""

    source: str  # the --strategy text
    digest: str  # SHA-256 of the file that defines it


class _Base:
    """What both kinds share: a name, state for the checkpoint, per-round client settings."""

    name: str = ""
    run: RunSpec | None = None  # set by the server before the first round
    origin: Origin | None = None  # set by the loader for a strategy given with --strategy

    def state(self) -> dict[str, np.ndarray]:
        """What the strategy carries from round to round, for the checkpoint; {} if nothing."""
        return {}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Take up the state a checkpoint saved (what `state()` returned then)."""
        if state:
            raise ConfigError(
                f"the checkpoint holds strategy state ({', '.join(sorted(state)[:3])}...), but "
                f"--strategy {self.name} keeps none"
            )

    def round_settings(self, round: int) -> dict[str, Any]:
        """Settings the clients of round `round` (1-based) receive with their instruction; {}: none."""
        return {}

    def configure(self, run: RunSpec) -> None:
        """Called by the server once, before the first round (a resumed run's too)."""
        self.run = run

    def train_tensors(self) -> dict[str, np.ndarray]:
        """Tensors every client receives with the round's TRAIN beside the weights, by name
        (sent as float32); {}: none. Called as each round opens."""
        return {}

    def update_tensors(self, model: Sequence[TensorSpec]) -> Sequence[TensorSpec]:
        """The tensors every update must list after the model's (`model`: the model's tensors,
        in order), float32; (): none. Called once, before the first round."""
        return ()

    @property
    def takes_tensors(self) -> bool:
        """True when updates carry tensors of the strategy's own (it defines update_tensors)."""
        return type(self).update_tensors is not _Base.update_tensors

    # -- the server's side of the tensors ---------------------------------------------------

    _extra_specs: tuple[TensorSpec, ...] = ()

    def use_model(self, specs: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
        """The model's tensors; returns the extras an update lists after them (checked)."""
        extras = tuple(self.update_tensors(tuple(specs)))
        names = [s.name for s in (*specs, *extras)]
        if len(set(names)) != len(names) or any(s.dtype != "float32" for s in extras):
            raise ConfigError(
                f"strategy {self.name!r}: update_tensors must name float32 tensors whose names "
                f"are new, got {[(s.name, s.dtype) for s in extras]}"
            )
        self._extra_specs = extras
        return extras

    def round_tensors(self) -> list[tuple[TensorSpec, np.ndarray]]:
        """`train_tensors()` as (spec, float32 array) pairs, for the TRAIN."""
        pairs = []
        for name, array in self.train_tensors().items():
            tensor = np.ascontiguousarray(array, np.float32)
            pairs.append((TensorSpec(name, "float32", tuple(tensor.shape)), tensor))
        return pairs

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class MeanStrategy(_Base):
    """A strategy over FedAvg's streamed sum. Hooks: `weight`, `step`; as it is, FedAvg."""

    privacy: CentralDP | None = None
    _fold: StreamedMean | None = None
    _noise: np.random.Generator | None = None

    def weight(self, num_examples: int) -> float:
        """What an update's change is multiplied by in the sum (positive; default its examples).
        Called for each tensor on the thread that received it: keep it cheap and stateless."""
        return num_examples

    def step(self, weights: Weights, mean_change: Weights, round: RoundTotals) -> Weights:
        """The next global weights, from the round's and the mean change: the sum of
        weight(n_i) x (w_i - weights) divided by round.examples. `mean_change` is yours to
        overwrite. Default: weights + mean_change (FedAvg)."""
        return apply_change(weights, mean_change, in_place=True)

    # -- the server's side ----------------------------------------------------------------

    def use_privacy(self, privacy: CentralDP | None) -> None:
        """Central DP (DP-FedAvg) around the sum: clip each update, add noise at the end."""
        self.privacy = privacy
        self._noise = noise_generator() if privacy is not None else None

    @property
    def weighs_by_examples(self) -> bool:
        """True when `weight` is the default: what secure aggregation and central DP assume."""
        return type(self).weight is MeanStrategy.weight

    def begin_round(self, global_weights: Sequence[np.ndarray], max_updates: int) -> None:
        zeros = [np.zeros(s.shape, np.float32) for s in self._extra_specs]  # extras sum from zero
        self._fold = StreamedMean([*global_weights, *zeros], max_updates, self.privacy, self._noise)

    def bound(self, reference: np.ndarray) -> float:
        return self._round().bound(reference)

    def prepare(
        self, tensor: np.ndarray, reference: np.ndarray, num_examples: int, *, in_place: bool
    ) -> np.ndarray:
        return self._round().prepare(tensor, reference, self.weight(num_examples), in_place=in_place)

    def add(self, update: Sequence[np.ndarray], num_examples: int) -> None:
        self._round().add(update, num_examples)

    def add_aggregate(self, sums: Sequence[np.ndarray], total_weight: int) -> None:
        """A sum of weighted changes made elsewhere (secure aggregation unmasks only the sum)."""
        self._round().add_aggregate(sums, total_weight)

    def result(self) -> Weights:
        fold, self._fold = self._round(), None
        count = len(fold.reference) - len(self._extra_specs)
        reference, change = list(fold.reference[:count]), fold.take_mean_change()
        totals = RoundTotals(
            fold.sum.total_examples if not fold.counts else sum(fold.counts),
            tuple(fold.counts),
            {s.name: t for s, t in zip(self._extra_specs, change[count:], strict=True)},
        )
        return checked_result(self, self.step(reference, change[:count], totals), reference)

    def _round(self) -> StreamedMean:
        if self._fold is None:
            raise RuntimeError("begin_round was not called")
        return self._fold


class UpdatesStrategy(_Base):
    """A strategy over each of the round's updates. Hook: `aggregate`."""

    _global: Weights | None = None
    _updates: list[Update] | None = None

    def aggregate(self, weights: Weights, updates: Sequence[Update]) -> Weights:
        """The next global weights, from the round's and every update accepted in it."""
        raise NotImplementedError(f"{type(self).__name__} must define aggregate(weights, updates)")

    # -- the server's side ----------------------------------------------------------------

    def begin_round(self, global_weights: Sequence[np.ndarray], max_updates: int) -> None:
        self._global = [np.asarray(w) for w in global_weights]
        self._updates = []

    def bound(self, reference: np.ndarray) -> float:
        """Finite is enough: the updates are kept as sent, nothing is summed."""
        return math.inf

    def prepare(
        self, tensor: np.ndarray, reference: np.ndarray, num_examples: int, *, in_place: bool
    ) -> np.ndarray:
        return tensor

    def add(self, update: Sequence[np.ndarray], num_examples: int) -> None:
        if self._updates is None:
            raise RuntimeError("begin_round was not called")
        # Read into memory now: an update staged on disk is deleted once it has been added.
        tensors = [np.asarray(t) for t in update]
        count = len(tensors) - len(self._extra_specs)
        extras = {s.name: t for s, t in zip(self._extra_specs, tensors[count:], strict=True)}
        self._updates.append(Update(tensors[:count], num_examples, extras))

    def result(self) -> Weights:
        if self._global is None or self._updates is None:
            raise RuntimeError("begin_round was not called")
        updates, self._updates = self._updates, None
        return checked_result(self, self.aggregate(self._global, updates), self._global)


def checked_result(strategy: _Base, result: object, reference: Sequence[np.ndarray]) -> Weights:
    """A strategy's new weights: as many arrays as the model's, each of its tensor's shape,
    cast to its dtype. A user's slip fails here with a sentence, not deep in the server."""
    where = f"strategy {strategy.name!r}"
    if not isinstance(result, list | tuple) or len(result) != len(reference):
        got = f"{len(result)} items" if isinstance(result, list | tuple) else type(result).__name__
        raise ValueError(f"{where} returned {got}; it must return a list of {len(reference)} numpy arrays")
    weights: Weights = []
    for index, (got, want) in enumerate(zip(result, reference, strict=True)):
        array = np.asarray(got)
        if array.shape != want.shape:
            raise ValueError(f"{where} returned tensor {index} of shape {array.shape}, not {want.shape}")
        weights.append(array if array.dtype == want.dtype else array.astype(want.dtype))
    return weights
