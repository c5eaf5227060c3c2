"""The round driver's events reach the sinks that keep a run's record: checkpoints, history.json,
the monitor behind the dashboard and /metrics, TensorBoard."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from fedgrpc.common.config import RunSpec
from fedgrpc.common.errors import RunFailedError
from fedgrpc.server.checkpoint import CheckpointSink, CheckpointStore
from fedgrpc.server.events import Event, EventBus, RoundClosed, RunClosed, RunStarted
from fedgrpc.server.monitor import Monitor, MonitorSink
from fedgrpc.server.phases import Phase, PhaseChange
from fedgrpc.server.results import ClientReport, ResultsSink, RoundRecord, RunResults
from prometheus_client import generate_latest

RUN = RunSpec(rounds=3, num_clients=2, run_id="events")
WEIGHTS = [np.full((2, 2), 0.5, np.float32)]


def record(n: int) -> RoundRecord:
    return RoundRecord(
        round=n, seconds=1.5, bytes_in=10, bytes_out=20, clients=[ClientReport(1, 5, {"loss": 0.1})],
        central={"accuracy": 0.25 * n, "loss": 1.0},
    )  # fmt: skip


def closed(history: list[RoundRecord]) -> RoundClosed:
    return RoundClosed(RUN, history[-1], tuple(history), WEIGHTS, {}, "accuracy")


class Seen:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def handle(self, event: Event) -> None:
        self.events.append(event)


def test_sinks_hear_every_event_in_the_order_they_subscribed() -> None:
    first, second = Seen(), Seen()
    order: list[str] = []

    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

        def handle(self, event: Event) -> None:
            order.append(self.name)

    bus = EventBus(first, Named("a"))
    bus.subscribe(Named("b"))
    bus.subscribe(second)
    started = RunStarted(RUN, False, WEIGHTS, (), {}, "accuracy")
    bus.publish(started)
    bus.publish(RunClosed())
    assert first.events == second.events == [started, RunClosed()]
    assert order == ["a", "b", "a", "b"]


def test_a_new_run_is_checkpointed_before_its_first_round_and_after_every_round(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoint")
    results = RunResults(tmp_path)
    stop = threading.Event()
    bus = EventBus(CheckpointSink(store, stop), ResultsSink(results, model=None, stop=stop))
    bus.publish(RunStarted(RUN, False, WEIGHTS, (), {}, "accuracy"))
    saved = store.load()
    assert saved is not None and saved.round == 0 and saved.history == []
    assert not results.history_path.exists()  # nothing happened yet

    history = [record(1)]
    bus.publish(closed(history))
    saved = store.load()
    assert saved is not None and saved.round == 1 and saved.history == history
    document = json.loads(results.history_path.read_text())
    assert document["finished"] is False and [r["round"] for r in document["rounds"]] == [1]


def test_a_resumed_run_keeps_its_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoint")
    store.save(RUN, 2, WEIGHTS, [record(1), record(2)])
    before = store.state_path.read_bytes()
    sink = CheckpointSink(store, threading.Event())
    sink.handle(RunStarted(RUN, True, WEIGHTS, (record(1), record(2)), {}, "accuracy"))
    assert store.state_path.read_bytes() == before


def test_a_first_checkpoint_that_cannot_be_written_stops_the_run(tmp_path: Path) -> None:
    (tmp_path / "checkpoint").write_text("a file where the folder should be")
    stop = threading.Event()
    stop.set()  # no waiting between the tries
    sink = CheckpointSink(CheckpointStore(tmp_path / "checkpoint"), stop)
    with pytest.raises(RunFailedError, match="no checkpoint can be written"):
        sink.handle(RunStarted(RUN, False, WEIGHTS, (), {}, "accuracy"))


def test_the_monitor_shows_phases_past_rounds_and_new_ones() -> None:
    monitor = Monitor(RUN)
    sink = MonitorSink(monitor)
    sink.handle(RunStarted(RUN, True, WEIGHTS, (record(1),), {}, "accuracy"))
    monitor.phase(PhaseChange(Phase.TRAINING, 2))  # phases come from the coordinator (watch_phase)
    state = monitor.snapshot()["state"]
    assert (state["phase"], state["round"], state["rounds_done"]) == ("training", 2, 1)
    sink.handle(closed([record(1), record(2)]))
    snapshot = monitor.snapshot()
    assert [r["round"] for r in snapshot["rounds"]] == [1, 2]
    assert snapshot["rounds"][-1]["central"] == {"accuracy": 0.5, "loss": 1.0}
    metrics = generate_latest(monitor.registry).decode()
    assert 'fedgrpc_evaluation{metric="accuracy",source="central"} 0.5' in metrics
    assert "fedgrpc_rounds_completed_total 2.0" in metrics
