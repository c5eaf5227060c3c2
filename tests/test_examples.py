"""Every example, end to end with real processes on small data: what the README promises runs."""

from __future__ import annotations

import difflib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fedgrpc.common.processes import free_port
from helpers import ENV, finish, finish_all, start, start_clients

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def server(port: int, out: Path, log: Path, *args: str) -> Any:
    return start(
        "fl-server", "--insecure", "--host", "127.0.0.1", "--port", str(port), "--out", str(out),
        "--threads", "1", *args, log=log,
    )  # fmt: skip


def make_sites(example: str, out: Path, *args: str) -> None:
    script = EXAMPLES / example / "make_sites.py"
    subprocess.run(
        [sys.executable, str(script), "--out", str(out), *args], check=True, env=ENV, capture_output=True
    )


def site_clients(port: int, task: Path, files: list[Path], logs: Path) -> list[Any]:
    started = []
    for k, data in enumerate(files, start=1):
        log = logs / f"client-{k}.log"
        process = start(
            "fl-client", "--insecure", "--id", str(k), "--server", f"127.0.0.1:{port}", "--task", str(task),
            "--data", str(data), "--threads", "1", log=log,
        )  # fmt: skip
        started.append((process, log))
    return started


def test_hospitals(tmp_path: Path) -> None:
    """Four hospitals, each with only its own CSV file; the server has none (federated evaluation)."""
    make_sites("hospitals", tmp_path / "data")
    files = sorted((tmp_path / "data").glob("hospital_*.csv"))
    config = tmp_path / "run.toml"
    config.write_text(
        (EXAMPLES / "hospitals" / "run.toml")
        .read_text()
        .replace('task = "task.py"', f'task = "{EXAMPLES}/hospitals/task.py"')
    )
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    # The run file's settings, with fewer rounds from the command line (flags override it).
    running = server(port, out, log, "--config", str(config), "--rounds", "2", "--out", str(out))
    finish_all(site_clients(port, EXAMPLES / "hospitals" / "task.py", files, tmp_path))
    assert finish(running, log) == 0, log.read_text()
    history = json.loads((out / "history.json").read_text())
    assert history["run"]["local_epochs"] == 5 and history["run"]["task_params"]["hidden_units"] == 32
    last = history["rounds"][-1]
    assert [r["num_examples"] for r in last["federated"]["reports"]] == [64, 42, 24, 12]  # a quarter held out
    assert last["federated"]["metrics"]["accuracy"] > 0.7
    assert "personalized_accuracy" in last["federated"]["metrics"]


def test_stations_a_regression_on_sequences(tmp_path: Path) -> None:
    make_sites("stations", tmp_path / "data", "--days", "20")
    files = sorted((tmp_path / "data").glob("station_*.csv"))
    task = EXAMPLES / "stations" / "task.py"
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    running = server(
        port, out, log, "--task", str(task), "--rounds", "2", "--clients", "3", "--local-epochs", "2"
    )
    finish_all(site_clients(port, task, files, tmp_path))
    assert finish(running, log) == 0, log.read_text()
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    maes = [r["federated"]["metrics"]["mae"] for r in rounds]
    assert maes[-1] < 5.0  # degrees; the series swing by tens of degrees
    assert "round 2/2  fed mae" in log.read_text()


def test_the_cifar10_example_task(tmp_path: Path, synthetic_npz: Path) -> None:
    task = EXAMPLES / "cifar10" / "task.py"
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    running = server(port, out, log, "--task", str(task), "--rounds", "2", "--data", str(synthetic_npz))
    finish_all(start_clients(port, synthetic_npz, tmp_path, extra=("--insecure", "--task", str(task))))
    assert finish(running, log) == 0, log.read_text()
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and rounds[-1]["central"]["accuracy"] > 0


def test_the_reference_script_made_a_client_with_five_lines(tmp_path: Path, synthetic_npz: Path) -> None:
    """examples/cifar10_script.py against the built-in cifar10 task's server, 3 script clients."""
    original = (EXAMPLES / "cifar10_centralized.py").read_text().split('"""', 2)[2].splitlines()
    federated = (EXAMPLES / "cifar10_script.py").read_text().split('"""', 2)[2].splitlines()
    changed = [
        line
        for line in difflib.unified_diff(original, federated, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert sum(line.startswith("+") for line in changed) == 5, changed  # 4 added, 1 rewritten
    assert sum(line.startswith("-") for line in changed) == 1, changed

    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    running = server(port, out, log, "--rounds", "2", "--data", str(synthetic_npz))
    scripts = []
    for k in (1, 2, 3):
        env = ENV | {
            "FL_SERVER": f"127.0.0.1:{port}",
            "FL_CLIENT_ID": str(k),
            "FL_INSECURE": "1",
            "FL_DATA": str(synthetic_npz),
        }
        script_log = tmp_path / f"script-{k}.log"
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "cifar10_script.py")],
            stdout=script_log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        scripts.append((process, script_log))
    try:
        for process, script_log in scripts:
            assert finish(process, script_log) == 0, script_log.read_text()
        assert finish(running, log) == 0, log.read_text()
    finally:
        for process, _ in scripts:
            if process.poll() is None:
                process.kill()
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    assert [sorted(c["client_id"] for c in r["clients"]) for r in rounds] == [[1, 2, 3], [1, 2, 3]]
    assert [c["num_examples"] for c in rounds[0]["clients"]] == [100, 100, 100]  # each its shard


@pytest.mark.parametrize("example", ["hospitals", "stations"])
def test_the_make_sites_scripts_are_seeded(tmp_path: Path, example: str) -> None:
    make_sites(example, tmp_path / "a")
    make_sites(example, tmp_path / "b")
    for a in sorted((tmp_path / "a").iterdir()):
        assert a.read_bytes() == (tmp_path / "b" / a.name).read_bytes()


def test_the_readme_task_runs_as_the_readme_says(tmp_path: Path) -> None:
    """The task file and the fl-local line of the README's "Your own task", as written there."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    source = readme.split("```python\n# my_task.py\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_task.py").write_text(source)
    make_sites("hospitals", tmp_path / "data")
    line = next(ln for ln in readme.splitlines() if ln.startswith("fl-local --task my_task.py"))
    command = line.split("#", 1)[0].replace("'data/hospital_{id}.csv'", "data/hospital_{id}.csv").split()
    assert command[:3] == ["fl-local", "--task", "my_task.py"]
    command[command.index("--rounds") + 1] = "2"  # as written, but two rounds
    dash = command.index("--")
    command[dash:dash] = ["--threads", "1", "--out", "out"]
    result = subprocess.run(
        [sys.executable, "-m", "fedgrpc.server.local", *command[1:]],
        cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = json.loads((tmp_path / "out" / "history.json").read_text())["rounds"]
    assert len(rounds) == 2 and rounds[-1]["federated"]["clients"] == 4
