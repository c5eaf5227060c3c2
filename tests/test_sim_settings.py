"""fl-sim's settings and failures: a run file's values are not overridden by fl-sim's own
defaults, `{id}` in --data gives each client id its own file (as in fl-local and fl-client),
and clients that cannot load their data end the run at once with their error."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import BIN, ENV
from test_sim import HAS_RAY
from test_tasks import write_site, write_task

pytestmark = pytest.mark.skipif(not HAS_RAY, reason="Ray is an optional extra: pip install 'fedgrpc[ray]'")


def fl_sim(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "fl-sim"), *args, "--", "--threads", "1"],
        cwd=cwd, capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip


def test_fl_sim_takes_a_run_file_and_gives_each_id_its_own_data(tmp_path: Path) -> None:
    """The file's 4 clients and 1 round, not fl-sim's defaults of 100 and 10; site_{id}.npz of
    40, 50, 60 and 70 rows (20 held out by the task) trains 20, 30, 40 and 50 examples."""
    write_task(tmp_path)
    for k in range(1, 5):
        write_site(tmp_path / f"site_{k}.npz", 30 + 10 * k, seed=k)
    (tmp_path / "run.toml").write_text('[run]\ntask = "table_task.py"\nclients = 4\nrounds = 1\n')
    result = fl_sim(
        "--config", str(tmp_path / "run.toml"), "--data", str(tmp_path / "site_{id}.npz"),
        "--out", str(tmp_path / "out"), "--logs", str(tmp_path / "logs"), cwd=tmp_path,
    )  # fmt: skip
    server_log = (tmp_path / "logs" / "server.log").read_text()
    assert result.returncode == 0, result.stderr[-3000:] + server_log[-3000:]
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert len(history["rounds"]) == 1 and history["run"]["num_clients"] == 4
    trained = {c["client_id"]: c["num_examples"] for c in history["rounds"][0]["clients"]}
    assert trained == {1: 20, 2: 30, 3: 40, 4: 50}


def test_fl_sim_reports_clients_that_cannot_load_their_data_and_exits(tmp_path: Path) -> None:
    """Every client's load_data fails: fl-sim says why and exits 1, with no traceback of its own
    (it used to wait 60 s for a server that waited for those clients, then raise TimeoutExpired)."""
    write_task(tmp_path)
    result = fl_sim(
        "--task", str(tmp_path / "table_task.py"), "--clients", "2", "--rounds", "1",
        "--data", str(tmp_path / "missing_{id}.npz"), "--out", str(tmp_path / "out"),
        "--logs", str(tmp_path / "logs"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "2 client(s) failed" in result.stderr, result.stderr[-3000:]
    assert "missing_1.npz" in result.stderr and "missing_2.npz" in result.stderr, result.stderr[-3000:]
    assert "TimeoutExpired" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]


def test_reports_that_come_after_the_server_exited_0_are_still_collected() -> None:
    """fl-server may exit 0 (its clients heard the end) a moment before the last Ray actor's
    report arrives: that report is waited for, not dropped with the actors killed and an exit
    of 1. A real Ray task reports 5 s after a real process exited 0."""
    import ray
    from fedgrpc.client.sim import collect_reports

    report = {"rounds": {"1": 1}, "train_seconds": 0.5, "failures": {}}
    ray.init(num_cpus=1, include_dashboard=False)
    try:

        @ray.remote
        def late_report() -> str:
            time.sleep(5)
            return json.dumps(report)

        server = subprocess.Popen([sys.executable, "-c", "pass"], text=True)
        assert server.wait(timeout=60) == 0
        pending = {late_report.remote(): 0}
        reports, broken = collect_reports(ray, pending, server, timeout_s=300)
    finally:
        ray.shutdown()
    assert (reports, broken, pending) == ([report], [], {})
