"""Checkpoints survive crashes and refuse damage."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fedgrpc.common.config import RunSpec
from fedgrpc.common.errors import CheckpointError
from fedgrpc.server.checkpoint import CheckpointStore, weights_digest
from fedgrpc.server.results import ClientReport, FederatedRecord, RoundRecord

RUN = RunSpec(rounds=5, num_clients=2, run_id="abc")


def weights(value: float) -> list[np.ndarray]:
    return [np.full((3, 2), value, np.float32), np.arange(4, dtype=np.int64)]


def record(n: int) -> RoundRecord:
    return RoundRecord(
        round=n,
        seconds=2.0,
        bytes_in=10,
        bytes_out=20,
        clients=[ClientReport(1, 5, {"loss": 0.1})],
        central={"accuracy": 0.5, "loss": 1.25},
        federated=FederatedRecord(2, 40, {"accuracy": 0.25}, [ClientReport(1, 30, {"accuracy": 0.3})]),
        start_digest="a",
        end_digest="b",
    )


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "checkpoint")
    store.save(RUN, 1, weights(1.0), [record(1)])
    store.save(RUN, 2, weights(2.0), [record(1), record(2)])
    return store


def test_roundtrip(store: CheckpointStore) -> None:
    checkpoint = store.load()
    assert checkpoint is not None
    assert checkpoint.run == RUN and checkpoint.round == 2
    assert checkpoint.history == [record(1), record(2)]
    for got, want in zip(checkpoint.weights, weights(2.0), strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype
    assert checkpoint.digest == weights_digest(weights(2.0))
    assert [p.name for p in store.directory.glob("weights-*.npz")] == ["weights-0002.npz"]


def test_no_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "none").load() is None


def test_a_crash_before_the_state_switch_keeps_the_previous_checkpoint(store: CheckpointStore) -> None:
    (store.directory / "weights-0003.npz").write_bytes(b"half a file")  # died while writing round 3
    checkpoint = store.load()
    assert checkpoint is not None and checkpoint.round == 2


def test_truncated_state_is_refused(store: CheckpointStore) -> None:
    store.state_path.write_bytes(store.state_path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        store.load()


def test_edited_state_is_refused(store: CheckpointStore) -> None:
    document = json.loads(store.state_path.read_text())
    document["round"] = 4
    store.state_path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        store.load()


def test_corrupted_weights_are_refused(store: CheckpointStore) -> None:
    path = store.directory / "weights-0002.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="weights-0002.npz does not match its checksum"):
        store.load()


def test_missing_weights_are_refused(store: CheckpointStore) -> None:
    (store.directory / "weights-0002.npz").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        store.load()


def test_a_metric_that_is_not_finite_is_written_as_null(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoint")
    diverged = replace(record(1), central={"accuracy": 0.1, "loss": float("inf")})
    store.save(RUN, 1, weights(1.0), [diverged])
    text = store.state_path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["history"][0]["central"] == {"accuracy": 0.1, "loss": None}
    checkpoint = store.load()
    assert checkpoint is not None and math.isnan(checkpoint.history[0].central["loss"])  # type: ignore[index]
