"""Real fl-server and fl-client processes on 127.0.0.1, small synthetic data."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
from fedgrpc.common.processes import free_port
from helpers import BIN, ENV, finish, finish_all, server_command, start, start_clients


def test_three_clients_two_rounds_end_to_end(tmp_path: Path, synthetic_npz: Path) -> None:
    port, out = free_port(), tmp_path / "out"
    server_log = tmp_path / "server.log"
    server = start(
        *server_command(port, synthetic_npz, out, rounds=2, clients=3, extra=("--record-updates",)),
        log=server_log,
    )
    finish_all(start_clients(port, synthetic_npz, tmp_path))
    assert finish(server, server_log) == 0, server_log.read_text()

    history = json.loads((out / "history.json").read_text())
    assert history["finished"] is True
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    for record in history["rounds"]:
        assert 0.0 <= record["central"]["accuracy"] <= 1.0 and record["central"]["loss"] > 0
        assert record["federated"] is None  # the server has a test set: central evaluation only
        assert sorted(c["client_id"] for c in record["clients"]) == [1, 2, 3]
        assert record["bytes_in"] > 3 * 167_562 * 4 and record["bytes_out"] > 3 * 167_562 * 4
    assert "round 2/2  acc" in server_log.read_text()

    # The saved global model is exactly the example-weighted mean of the last round's accepted updates.
    import keras

    last = history["rounds"][-1]
    counts = {c["client_id"]: c["num_examples"] for c in last["clients"]}
    assert sum(counts.values()) == 300  # 3 shards of 100
    updates = []
    for client_id, n in counts.items():
        with np.load(out / "updates" / "round-0002" / f"client-{client_id}.npz") as npz:
            updates.append(([npz[k] for k in sorted(npz.files)], n))
    expected = [sum(w[i].astype(np.float64) * n for w, n in updates) / sum(counts.values()) for i in range(8)]
    saved = keras.models.load_model(out / "final_model.keras").get_weights()
    for got, want in zip(saved, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_client_id_outside_the_run_is_refused_clearly(tmp_path: Path, synthetic_npz: Path) -> None:
    port = free_port()
    server_log = tmp_path / "server.log"
    server = start(
        *server_command(port, synthetic_npz, tmp_path / "out", rounds=1, clients=2), log=server_log
    )
    try:
        result = subprocess.run(
            [
                str(BIN / "fl-client"),
                "--insecure",
                "--id",
                "3",
                "--server",
                f"127.0.0.1:{port}",
                "--data",
                str(synthetic_npz),
            ],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=120,
        )
        assert result.returncode == 2
        assert "client id 3 is not part of this run: ids are 1..2" in result.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_unreachable_server_fails_after_the_connect_timeout() -> None:
    result = subprocess.run(
        [
            str(BIN / "fl-client"),
            "--insecure",
            "--id",
            "1",
            "--server",
            f"127.0.0.1:{free_port()}",
            "--connect-timeout",
            "2",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert result.returncode == 2
    assert "is fl-server running there?" in result.stderr


def test_a_skewed_partition_is_summarised_as_the_clients_cut_it(tmp_path: Path) -> None:
    from conftest import write_synthetic

    data = write_synthetic(tmp_path / "data.npz", train=600, test=100)
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    extra = ("--partition", "dirichlet:0.3", "--partition-seed", "5")
    server = start(*server_command(port, data, out, rounds=1, clients=3, extra=extra), log=log)
    finish_all(start_clients(port, data, tmp_path))
    assert finish(server, log) == 0, log.read_text()
    summary = json.loads((out / "partition.json").read_text())
    trained = {
        c["client_id"]: c["num_examples"]
        for c in json.loads((out / "history.json").read_text())["rounds"][0]["clients"]
    }
    assert {c["client_id"]: c["examples"] for c in summary["clients"]} == trained
    assert all(sum(c["labels"]) == c["examples"] for c in summary["clients"])
    assert len(set(trained.values())) > 1  # skewed, not equal IID shards
    assert (out / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
