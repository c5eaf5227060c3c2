"""What a run tells the parts that keep its record: the round driver publishes, sinks listen.

The driver says what happened (a round closed with its record, the run finished) and knows
nothing of where that goes. Phases (training, aggregating, evaluating, finished) are the
coordinator's own state: the monitor hears them from it directly (RoundCoordinator.watch_phase),
so they are tracked in one place. Each sink is one concern, in the module that owns
it: history.json and the curves (server.results), checkpoints (server.checkpoint), the dashboard
and the Prometheus metrics (server.monitor), TensorBoard (server.tensorboard).

One run publishes, in order:

    RunStarted ─> RoundClosed* ─> RunFinished ─> RunClosed

A round trained again (non-finite weights, secure aggregation aborted) publishes nothing until
it closes; a stopped run skips RunFinished but always ends with RunClosed. Sinks are called in
the order they subscribed, on the driver's thread; a sink that cannot do its part and must stop
the run raises (RunFailedError), and the bus lets it through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the sinks' modules import this one
    import numpy as np

    from ..common.config import RunSpec
    from .results import RoundRecord


@dataclass(frozen=True)
class RunStarted:
    """The run is set up, before any client can join: a new one (`resumed` False, whose
    initial weights are `weights`) or one resumed from its checkpoint, whose past rounds are
    `history`."""

    run: RunSpec
    resumed: bool
    weights: Sequence[np.ndarray]
    history: Sequence[RoundRecord]
    strategy_state: Mapping[str, np.ndarray]
    main_metric: str  # the task's declared main metric ("accuracy" when it names none)


@dataclass(frozen=True)
class RoundClosed:
    """A round is complete: its record, and what a checkpoint after it holds."""

    run: RunSpec
    record: RoundRecord
    history: Sequence[RoundRecord]  # every complete round so far, this one last
    weights: Sequence[np.ndarray]
    strategy_state: Mapping[str, np.ndarray]
    main_metric: str  # the metric this round is judged by (server.evaluation.main_metric)


@dataclass(frozen=True)
class RunFinished:
    """Every round is done: the final weights and history."""

    run: RunSpec
    history: Sequence[RoundRecord]
    weights: Sequence[np.ndarray]
    main_metric: str


@dataclass(frozen=True)
class RunClosed:
    """The server is going down, finished or stopped: let go of files and threads."""


Event = RunStarted | RoundClosed | RunFinished | RunClosed


class Sink(Protocol):
    """Something that keeps part of a run's record; it ignores the events it has no use for."""

    def handle(self, event: Event) -> None: ...


class EventBus:
    """Hands every event to every sink, in the order they subscribed."""

    def __init__(self, *sinks: Sink) -> None:
        self._sinks: list[Sink] = list(sinks)

    def subscribe(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def publish(self, event: Event) -> None:
        for sink in self._sinks:
            sink.handle(event)
