"""`fl-local` as the README describes it: which processes it starts (`--gpus`, `--schedule`),
that clients taking turns never train at once, and evaluation by `--eval-fraction` of the
clients and centrally on the task's `load_test_data`."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fedgrpc.server.checkpoint import CheckpointStore
from helpers import BIN, ENV, STARTED, finish

FEATURES = 8


def examples(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A linearly separable problem, the same wherever it is drawn."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = (x.sum(axis=1) > 0).astype(np.float32)[:, None]
    return x, y


TASK = '''
import fcntl
import json
import os
import time
from pathlib import Path

import keras
import numpy as np
from fedgrpc.common.task import LocalData, Task, fit_model

FEATURES = 8
RECORDS = Path({records!r})
LOCK = Path({lock!r})


{examples}

def build_model(params):
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy", metrics=["accuracy"])
    return model


def load_data(site):
    x, y = examples(site.client_id, 64)
    return LocalData(train=(x[:48], y[:48]), test=(x[48:], y[48:]))


def load_test_data(site):
    return examples(0, 200)


def train(model, data, ctx):
    """Records when it trained and whether its turn was held (a second hold must not be granted)."""
    started = time.monotonic()
    with open(LOCK, "a") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
            fcntl.flock(probe, fcntl.LOCK_UN)
        except BlockingIOError:
            held = True
    metrics = fit_model(model, data, ctx)
    time.sleep(0.5)  # long enough that clients training at once would overlap
    record = {{"pid": os.getpid(), "round": ctx.round, "held": held}}
    record.update(start=started, end=time.monotonic())
    (RECORDS / f"{{os.getpid()}}-{{ctx.round}}.json").write_text(json.dumps(record))
    return metrics


task = Task("turns", build_model, load_data, load_test_data=load_test_data, train=train)
'''


def children(pid: int) -> dict[int, list[str]]:
    """The command lines of the processes whose parent is `pid`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and cmdline:
            found[int(entry.name)] = cmdline.decode().rstrip("\0").split("\0")
    return found


def wait_children(process: subprocess.Popen[bytes], count: int, timeout: float = 60) -> dict[int, list[str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {pid: argv for pid, argv in children(process.pid).items() if "-m" in argv}  # past exec
        if len(found) >= count:
            return found
        assert process.poll() is None, f"fl-local exited {process.returncode}"
        time.sleep(0.05)
    pytest.fail(f"fl-local did not start {count} processes in {timeout} s")


def fl_local(*args: str, log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [str(BIN / "fl-local"), *args], stdout=log.open("ab"), stderr=subprocess.STDOUT, env=ENV
    )
    STARTED.append(process)
    return process


def layout(found: dict[int, list[str]]) -> tuple[list[str], dict[int, list[str]]]:
    """The server's command line, and each client's by id."""
    server = [argv for argv in found.values() if "fedgrpc.server.cli" in argv]
    clients = {
        int(argv[argv.index("--id") + 1]): argv for argv in found.values() if "fedgrpc.client.cli" in argv
    }
    assert len(server) == 1, found
    return server[0], clients


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_gpus_put_client_k_on_the_listed_cards_round_robin_all_at_once(tmp_path: Path) -> None:
    process = fl_local(
        "--clients",
        "3",
        "--rounds",
        "1",
        "--gpus",
        "0,1",
        "--out",
        str(tmp_path / "out"),
        log=tmp_path / "local.log",
    )
    try:
        server, clients = layout(wait_children(process, 4))
    finally:
        for pid in children(process.pid):  # the layout is all this test needs: stop them now
            os.kill(pid, signal.SIGKILL)
        finish(process, tmp_path / "local.log", timeout=60)
    assert sorted(clients) == [1, 2, 3]
    assert [option(clients[k], "--gpu") for k in (1, 2, 3)] == ["0", "1", "0"]
    assert all("--take-turns" not in argv for argv in clients.values())  # on GPUs they train at once
    port = option(server, "--port")
    assert all(option(argv, "--server") == f"127.0.0.1:{port}" for argv in clients.values())


def test_clients_taking_turns_never_train_at_once_and_both_evaluations_are_recorded(tmp_path: Path) -> None:
    out, records, log = tmp_path / "out", tmp_path / "records", tmp_path / "local.log"
    records.mkdir()
    lock = out / ".train.lock"
    task = tmp_path / "turns_task.py"
    task.write_text(TASK.format(records=str(records), lock=str(lock), examples=inspect.getsource(examples)))
    process = fl_local(
        "--clients", "3", "--rounds", "2", "--schedule", "turns", "--task", str(task), "--out", str(out),
        "--", "--eval-fraction", "0.67", "--eval-every", "1",
        log=log,
    )  # fmt: skip
    _, clients = layout(wait_children(process, 4))
    assert all(option(argv, "--take-turns") == str(lock) for argv in clients.values())
    assert finish(process, log, timeout=400) == 0, log.read_text()[-3000:]

    runs = [json.loads(p.read_text()) for p in records.iterdir()]
    assert sorted(r["round"] for r in runs) == [1, 1, 1, 2, 2, 2] and all(r["held"] for r in runs)
    assert len({r["pid"] for r in runs}) == 3
    ordered = sorted(runs, key=lambda r: r["start"])
    for before, after in zip(ordered, ordered[1:], strict=False):
        assert before["end"] <= after["start"], (before, after)  # one at a time

    history = json.loads((out / "history.json").read_text())
    for record in history["rounds"]:
        assert record["federated"]["clients"] == 2  # round(0.67 x 3) of the clients evaluated
        assert len(record["federated"]["reports"]) == 2
        assert set(record["central"]) >= {"accuracy", "loss"}
    checkpoint = CheckpointStore(out / "checkpoint").load()
    assert checkpoint is not None and checkpoint.round == 2
    kernel, bias = (np.asarray(w, np.float64) for w in checkpoint.weights)
    x, y = examples(0, 200)
    p = np.clip(1 / (1 + np.exp(-(x @ kernel + bias))), 1e-7, 1 - 1e-7)
    central = history["rounds"][-1]["central"]  # the final model on load_test_data's examples
    assert central["accuracy"] == pytest.approx(float(np.mean((p > 0.5) == (y > 0.5))), abs=1e-6)
    want_loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert central["loss"] == pytest.approx(want_loss, rel=1e-4)
