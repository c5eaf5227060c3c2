"""fl-sim: client ids served by Ray actors against a real fl-server, on a real local Ray
(started by fl-sim itself, or a cluster started beforehand with `ray start --head`)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fedgrpc.common.processes import free_port
from helpers import BIN, ENV

HAS_RAY = importlib.util.find_spec("ray") is not None
pytestmark = pytest.mark.skipif(
    not HAS_RAY and not os.environ.get("CI"), reason="Ray is an optional extra: pip install 'fedgrpc[ray]'"
)


def _sim(
    tmp_path: Path, data: Path, *extra: str, env: dict[str, str] = ENV
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "out"
    command = [
        str(BIN / "fl-sim"), "--clients", "8", "--clients-per-round", "3", "--rounds", "2",
        "--data", str(data), "--out", str(out), "--logs", str(tmp_path), *extra, "--", "--threads", "1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    server_log = (tmp_path / "server.log").read_text() if (tmp_path / "server.log").exists() else ""
    assert result.returncode == 0, result.stderr[-4000:] + server_log[-3000:]
    return result, json.loads((out / "history.json").read_text())


def _check_rounds(history: dict[str, Any]) -> None:
    samples = [sorted(c["client_id"] for c in r["clients"]) for r in history["rounds"]]
    assert [len(s) for s in samples] == [3, 3] and samples[0] != samples[1]
    assert all(1 <= c <= 8 for s in samples for c in s)
    assert history["finished"] is True


def test_many_client_ids_on_a_local_ray_train_real_rounds(tmp_path: Path, synthetic_npz: Path) -> None:
    assert HAS_RAY, "CI installs fedgrpc[ray]"
    result, history = _sim(tmp_path, synthetic_npz)
    _check_rounds(history)
    # fl-sim's own Ray has one CPU per core here and each actor takes one: as many actors as
    # there are cores, at most the 3 clients of a round, each serving its share of the 8 ids
    actors = min(os.cpu_count() or 1, 3)
    assert f"8 client ids on {actors} Ray actors" in result.stderr
    assert f"6 client rounds trained by {actors} actors" in result.stderr
    assert "0 client(s) failed" in result.stderr


def test_fl_sim_joins_a_running_cluster(tmp_path: Path, synthetic_npz: Path) -> None:
    assert HAS_RAY, "CI installs fedgrpc[ray]"
    port = free_port()
    ray = str(BIN / "ray")
    head = [ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
            "--include-dashboard", "false",
            "--disable-usage-stats"]  # fmt: skip
    env = {**ENV, "RAY_AUTH_MODE": "disabled"}  # a cluster of one machine, on loopback, for this test
    subprocess.run(head, check=True, capture_output=True, env=env, timeout=180)
    try:
        address = f"127.0.0.1:{port}"
        result, history = _sim(tmp_path, synthetic_npz, "--ray", address, "--actors", "1", env=env)
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)
    _check_rounds(history)
    assert "8 client ids on 1 Ray actors" in result.stderr
