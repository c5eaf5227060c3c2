"""Checkpoints survive crashes and refuse damage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedgrpc.common.config import RunSpec
from fedgrpc.common.errors import CheckpointError
from fedgrpc.server.checkpoint import CheckpointStore, weights_digest
from fedgrpc.server.results import ClientReport, RoundRecord

RUN = RunSpec(rounds=5, num_clients=2, run_id="abc")


def weights(value: float) -> list[np.ndarray]:
    return [np.full((3, 2), value, np.float32), np.arange(4, dtype=np.int64)]


def record(n: int) -> RoundRecord:
    return RoundRecord(n, 0.5, 1.0, 2.0, 10, 20, [ClientReport(1, 5, {"loss": 0.1})], "a", "b")


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
