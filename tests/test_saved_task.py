"""A server of training scripts starts from a saved model alone (`--task model.keras`): no task
file on the server."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from fedgrpc.common.processes import free_port
from helpers import ENV, finish, start

# Builds the scripts' model; with a path, saves it there (compiled) and exits.
MODEL = """
import keras

def model():
    keras.utils.set_random_seed(3)
    built = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"),
                              keras.layers.Dense(1)])
    built.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return built

if __name__ == "__main__":
    import sys
    model().save(sys.argv[1])
"""

# A site's training script: five lines of fedgrpc.client around its own Keras loop; it keeps
# what it submits in the last round, for the test to recompute the server's mean.
SCRIPT = """
import os, sys
import numpy as np
import fedgrpc.client as fl
from model import model

k = int(os.environ["FL_CLIENT_ID"])
rng = np.random.default_rng(k)
x = rng.normal(size=(20 * k, 4)).astype("float32")
y = x.sum(axis=1, keepdims=True)
net = model()
federation = fl.connect()
for round in federation.rounds(net):
    net.fit(x, y, epochs=1, batch_size=8, verbose=0)
    np.savez(sys.argv[1], *net.get_weights())
    round.submit(net, num_examples=len(x))
"""


def test_a_server_of_scripts_starts_from_a_saved_model_without_a_task_file(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text(textwrap.dedent(MODEL))
    (tmp_path / "site.py").write_text(textwrap.dedent(SCRIPT))
    saved = tmp_path / "model.keras"
    subprocess.run([sys.executable, str(tmp_path / "model.py"), str(saved)], check=True, env=ENV, timeout=120)

    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    server = start(
        "fl-server", "--insecure", "--host", "127.0.0.1", "--port", str(port), "--out", str(out),
        "--threads", "1", "--clients", "2", "--rounds", "2", "--task", str(saved), log=log,
    )  # fmt: skip
    scripts: list[tuple[Any, Path]] = []
    for k in (1, 2):
        env = ENV | {"FL_SERVER": f"127.0.0.1:{port}", "FL_CLIENT_ID": str(k), "FL_INSECURE": "1"}
        script_log = tmp_path / f"site-{k}.log"
        process = subprocess.Popen(
            [sys.executable, str(tmp_path / "site.py"), str(tmp_path / f"sent-{k}.npz")],
            cwd=tmp_path, stdout=script_log.open("wb"), stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        scripts.append((process, script_log))
    try:
        for process, script_log in scripts:
            assert finish(process, script_log) == 0, script_log.read_text()
        assert finish(server, log) == 0, log.read_text()
    finally:
        for process, _ in scripts:
            if process.poll() is None:
                process.kill()

    assert "task saved:model.keras" in log.read_text()
    sent = [np.load(tmp_path / f"sent-{k}.npz") for k in (1, 2)]
    final = np.load(out / "checkpoint" / "weights-0002.npz")
    assert len(final.files) == 4
    for i in range(4):
        mean = (20 * sent[0][f"arr_{i}"].astype(np.float64) + 40 * sent[1][f"arr_{i}"]) / 60
        np.testing.assert_allclose(final[f"{i:04d}"], mean, rtol=1e-6, atol=1e-7)


def test_a_saved_model_must_have_been_compiled(tmp_path: Path) -> None:
    uncompiled = tmp_path / "uncompiled.keras"
    save_uncompiled = "import keras; keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]).save"
    subprocess.run(
        [sys.executable, "-c", f"{save_uncompiled}({str(uncompiled)!r})"], check=True, env=ENV, timeout=120
    )
    server_log = tmp_path / "server.log"
    server = start(
        "fl-server", "--insecure", "--host", "127.0.0.1", "--port", str(free_port()),
        "--out", str(tmp_path / "out"), "--task", str(uncompiled), log=server_log,
    )  # fmt: skip
    assert finish(server, server_log) == 2
    assert "saved before model.compile(...)" in server_log.read_text()
