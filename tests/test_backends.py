"""Keras on TensorFlow and on JAX, end to end with real processes, in one run and in separate ones."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from fedgrpc.common.processes import free_port
from helpers import finish, server_command, start

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None,
    reason="JAX is not installed (pip install -e '.[dev]', or 'fedgrpc[jax]')",
)


def test_a_tensorflow_client_and_a_jax_client_in_one_run(tmp_path: Path, synthetic_npz: Path) -> None:
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    server = start(*server_command(port, synthetic_npz, out, rounds=2, clients=2), log=log)
    clients = []
    for client_id, backend in ((1, "tensorflow"), (2, "jax")):
        client_log = tmp_path / f"client-{client_id}.log"
        command = ["fl-client", "--insecure", "--id", str(client_id), "--server", f"127.0.0.1:{port}"]
        process = start(
            *command,
            "--data",
            str(synthetic_npz),
            "--threads",
            "1",
            log=client_log,
            env={"KERAS_BACKEND": backend},
        )
        clients.append((process, client_log))
    for process, client_log in clients:
        assert finish(process, client_log) == 0, client_log.read_text()
    assert finish(server, log) == 0, log.read_text()
    assert "devices: tensorflow: CPU" in clients[0][1].read_text()
    jax_log = clients[1][1].read_text()
    assert "devices: jax: CPU" in jax_log and "Unable to initialize backend" not in jax_log
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    assert [sorted(c["client_id"] for c in r["clients"]) for r in rounds] == [[1, 2], [1, 2]]
    assert rounds[-1]["central"]["accuracy"] > 0


def test_everything_on_jax(tmp_path: Path, synthetic_npz: Path) -> None:
    """Server and clients on the JAX backend (the path GPU machines without TensorFlow take)."""
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    jax = {"KERAS_BACKEND": "jax"}
    server = start(*server_command(port, synthetic_npz, out, rounds=2, clients=2), log=log, env=jax)
    clients = []
    for client_id in (1, 2):
        client_log = tmp_path / f"client-{client_id}.log"
        command = ["fl-client", "--insecure", "--id", str(client_id), "--server", f"127.0.0.1:{port}"]
        clients.append(
            (
                start(*command, "--data", str(synthetic_npz), "--threads", "1", log=client_log, env=jax),
                client_log,
            )
        )
    for process, client_log in clients:
        assert finish(process, client_log) == 0, client_log.read_text()
    assert finish(server, log) == 0, log.read_text()
    assert "devices: jax: CPU" in log.read_text()
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    assert len(rounds) == 2 and rounds[-1]["central"]["accuracy"] > 0
