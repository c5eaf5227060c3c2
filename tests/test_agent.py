"""The site agent (fl-client --serve) with real processes on 127.0.0.1: one agent takes part in
one fl-server after another on the same port, without restarting, as its policy allows.

The tasks are tiny and train without shuffling, so a run's weights are a pure function of its
settings: the agent's results can be compared digest for digest with plain fl-clients'."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedgrpc.common.processes import free_port
from helpers import finish, start, wait_for_line

TASK = """
import time

import keras
import numpy as np
from fedgrpc.common.task import LocalData, Task

FEATURES = {features}


def build_model(params):
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.SGD(params["learning_rate"]), loss="binary_crossentropy",
                  metrics=["accuracy"])
    return model


def load_data(site):
    with np.load(site.data) as npz:
        return LocalData(train=(npz["x"], npz["y"]))


def load_test_data(site):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, FEATURES)).astype(np.float32)
    return x, (x.sum(axis=1) > 0).astype(np.float32)[:, None]


def train(model, data, ctx):
    x, y = data.train
    history = model.fit(x, y, batch_size=ctx.batch_size, epochs=ctx.epochs, shuffle=False, verbose=0)
    time.sleep({pause})
    return {{name: float(values[-1]) for name, values in history.history.items()}}


task = Task("{name}", build_model, load_data, load_test_data=load_test_data, train=train,
            params={{"learning_rate": 0.1}})
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """Two tasks (alpha: 4 features, beta: 6) and each client's data for each."""
    for name, features in (("alpha", 4), ("beta", 6)):
        (tmp_path / f"{name}.py").write_text(
            textwrap.dedent(TASK.format(name=name, features=features, pause=0.3 if name == "alpha" else 0))
        )
        for client in (1, 2):
            rng = np.random.default_rng(10 * client + features)
            x = rng.normal(size=(40, features)).astype(np.float32)
            np.savez(
                tmp_path / f"{name}-{client}.npz", x=x, y=(x.sum(axis=1) > 0).astype(np.float32)[:, None]
            )
    return tmp_path


def write_policy(folder: Path, site_table: str = "", tasks: tuple[str, ...] = ("alpha", "beta")) -> Path:
    entries = "".join(f'\n[[task]]\nname = "{t}"\nfile = "{t}.py"\ndata = "{t}-1.npz"\n' for t in tasks)
    path = folder / "site.toml"
    path.write_text(f"[site]\nretry_max = 1\n{site_table}\n{entries}")
    return path


def server(folder: Path, port: int, task: str, out: str, *extra: str, rounds: int = 2) -> Any:
    return start(
        "fl-server", "--insecure", "--host", "127.0.0.1", "--port", str(port),
        "--task", str(folder / f"{task}.py"), "--rounds", str(rounds), "--clients", "2",
        "--out", str(folder / out), "--threads", "1",
        "--finish-grace", "1", *extra, log=folder / f"{out}.log",
    )  # fmt: skip


def client(folder: Path, port: int, client_id: int, task: str, log: str) -> tuple[Any, Path]:
    """A plain one-run fl-client, and its log."""
    return start(
        "fl-client", "--insecure", "--id", str(client_id), "--server", f"127.0.0.1:{port}",
        "--task", str(folder / f"{task}.py"), "--data", str(folder / f"{task}-{client_id}.npz"),
        "--threads", "1", "--connect-timeout", "90", log=folder / f"{log}.log",
    ), folder / f"{log}.log"  # fmt: skip


def agent(folder: Path, port: int, policy: Path) -> Any:
    return start(
        "fl-client", "--insecure", "--id", "1", "--server", f"127.0.0.1:{port}", "--serve", "--policy",
        str(policy), "--threads", "1", "--connect-timeout", "90", log=folder / "agent.log",
    )  # fmt: skip


def run_to_the_end(folder: Path, out: str, running: Any, *clients: tuple[Any, Path]) -> dict[str, Any]:
    """Wait for the server and the plain clients; the run's history.json."""
    for process, log in clients:
        assert finish(process, log) == 0, log.read_text()
    assert finish(running, folder / f"{out}.log") == 0, (folder / f"{out}.log").read_text()
    history: dict[str, Any] = json.loads((folder / out / "history.json").read_text())
    assert history["finished"] is True
    return history


def digests(history: dict[str, Any]) -> list[str]:
    return [r["end_digest"] for r in history["rounds"]]


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=30)


def test_one_agent_takes_part_in_runs_of_two_tasks_one_after_another(site: Path) -> None:
    """alpha, then beta, then alpha again (warm: not rebuilt), with the same results as plain clients."""
    port, reference_port = free_port(), free_port()
    serving = agent(site, port, write_policy(site))
    # The reference: the same alpha run with two plain one-run fl-clients, on another port.
    plain = server(site, reference_port, "alpha", "plain")
    plain_clients = [client(site, reference_port, k, "alpha", f"plain-{k}") for k in (1, 2)]

    first = server(site, port, "alpha", "first")
    first_history = run_to_the_end(site, "first", first, client(site, port, 2, "alpha", "first-2"))
    reference = run_to_the_end(site, "plain", plain, *plain_clients)
    second = server(site, port, "beta", "second")
    second_history = run_to_the_end(site, "second", second, client(site, port, 2, "beta", "second-2"))
    third = server(site, port, "alpha", "third")
    third_history = run_to_the_end(site, "third", third, client(site, port, 2, "alpha", "third-2"))
    wait_for_line(site / "agent.log", f"run {third_history['run']['run_id']}: done", process=serving)
    stop(serving)

    for history in (first_history, second_history, third_history):
        assert [sorted(c["client_id"] for c in r["clients"]) for r in history["rounds"]] == [[1, 2], [1, 2]]
    assert second_history["run"]["task"]["name"] == "beta"
    assert digests(first_history) == digests(reference)  # the agent trains as a one-run fl-client does
    assert digests(third_history) == digests(reference)  # and so does its warm model, reused
    text = (site / "agent.log").read_text()
    assert text.count("task alpha: built its model and loaded its data (first run of this task)") == 1, text
    assert text.count("task beta: built its model") == 1, text
    assert "task alpha: reusing its warm model and data (1 reuses so far)" in text, text
    assert text.count("site agent for 2 tasks") == 1  # one process all along


def test_an_agent_refuses_a_run_its_policy_does_not_allow_and_the_run_goes_on(site: Path) -> None:
    port = free_port()
    serving = agent(site, port, write_policy(site, "max_rounds = 2\nmax_run_time = 6", tasks=("alpha",)))
    flags = ("--min-clients", "1", "--join-timeout", "3600")
    refused = server(site, port, "beta", "refused", *flags)
    history = run_to_the_end(site, "refused", refused, client(site, port, 2, "beta", "refused-2"))
    too_long = server(site, port, "alpha", "too-long", *flags, rounds=3)
    long_history = run_to_the_end(site, "too-long", too_long, client(site, port, 2, "alpha", "too-long-2"))
    # A run the agent takes, whose first round waits for a client that never comes: past
    # max_run_time the agent withdraws, saying so.
    stalled = server(site, port, "alpha", "stalled", *flags)
    wait_for_line(
        site / "stalled.log", "client 1 cannot take part: site policy: the run went on past", process=stalled
    )
    stalled.kill()
    stalled.wait()
    stop(serving)

    (withdrawn,) = history["withdrawn"]
    assert (
        withdrawn["client_id"] == 1
        and "site policy: this site does not run task 'beta'" in withdrawn["reason"]
    )
    assert all(sorted(c["client_id"] for c in r["clients"]) == [2] for r in history["rounds"])
    (withdrawn,) = long_history["withdrawn"]
    assert "the run has 3 rounds; this site takes part in at most 2" in withdrawn["reason"]
    text = (site / "agent.log").read_text()
    assert "refused: this site does not run task 'beta'" in text and "at most 2" in text, text
    assert "withdrew: the run went on past this site's max_run_time of 6 s" in text, text
    assert "cannot take part" in (site / "refused.log").read_text()


def test_an_agent_survives_a_coordinator_killed_and_restarted_mid_run(site: Path) -> None:
    port = free_port()
    serving = agent(site, port, write_policy(site))
    running = server(site, port, "alpha", "restarted", rounds=4)
    other = client(site, port, 2, "alpha", "restarted-2")
    wait_for_line(site / "restarted.log", "round 2/4", process=running)
    running.kill()
    running.wait()
    restarted = server(site, port, "alpha", "restarted", rounds=4)
    wait_for_line(site / "restarted.log", "resuming run", process=restarted)
    history = run_to_the_end(site, "restarted", restarted, other)
    wait_for_line(site / "agent.log", f"run {history['run']['run_id']}: done", process=serving)
    stop(serving)
    assert [r["round"] for r in history["rounds"]] == [1, 2, 3, 4]
    assert all(1 in [c["client_id"] for c in r["clients"]] for r in history["rounds"][2:])
    assert (site / "agent.log").read_text().count("site agent for") == 1
