"""Warm site agents vs a cold start: seconds from a job's submission to its round 1.

    python bench/standing.py [--rounds 2] [--retry-max 1] [--out standing.json]

The same run (a tiny Keras task, 3 sites with their own data, --rounds rounds) three ways, on
loopback without TLS:

- cold: today's one-run processes, `fl-server --config run.toml` and three `fl-client`s started
  together; from their start to the server's "round 1/N" line (TensorFlow imported, the model
  built, the data loaded, in every process).
- standing, first job: `fl-server --federation` and three `fl-client --serve` agents already up
  and idle (tasks imported, no model built yet); from `fl-job submit` to the job's round 1.
- standing, warm: the same agents after they ran a job of this task (models and data kept,
  fedgrpc.client.agent.WarmTasks); from the next `fl-job submit` to that job's round 1.

Between jobs the agents ask for a run every --retry-max seconds at most (their policy's
retry_max): it bounds the standing rows' wait. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fedgrpc.common.processes import free_port

BIN = Path(sys.executable).parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FL_ADMIN_TOKEN": "bench-token"}
SITES = (1, 2, 3)
TASK = """
import keras
import numpy as np
from fedgrpc.common.processes import free_port
from fedgrpc.common.task import LocalData, Task


def build_model(params):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="sgd", loss="binary_crossentropy", metrics=["accuracy"])
    return model


def load_data(site):
    with np.load(site.data) as npz:
        return LocalData(train=(npz["x"], npz["y"]))


def load_test_data(site):
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    return x, (x.sum(axis=1) > 0).astype(np.float32)[:, None]


task = Task("bench", build_model, load_data, load_test_data=load_test_data)
"""


def wait_for(log: Path, text: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return time.monotonic()
        time.sleep(0.02)
    raise SystemExit(f"{text!r} not in {log} after {timeout} s:\n{log.read_text()[-2000:]}")


def launch(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=ENV)


def prepare(folder: Path, rounds: int, retry_max: float) -> Path:
    """The task, each site's data and policy, and the run file; returns the run file."""
    (folder / "task.py").write_text(TASK)
    for site in SITES:
        x = np.random.default_rng(site).normal(size=(200, 8)).astype(np.float32)
        np.savez(folder / f"site-{site}.npz", x=x, y=(x.sum(axis=1) > 0).astype(np.float32)[:, None])
        (folder / f"site-{site}.toml").write_text(
            f'[site]\nretry_max = {retry_max}\n\n[[task]]\nname = "bench"\nfile = "task.py"\n'
            f'data = "site-{site}.npz"\n'
        )
    run = folder / "run.toml"
    run.write_text(
        f'[run]\ntask = "task.py"\nclients = 3\nrounds = {rounds}\nbatch_size = 32\nfinish_grace = 1\n'
    )
    return run


def cold(folder: Path, run: Path, rounds: int) -> float:
    """One-run fl-server and fl-clients started together: seconds to round 1."""
    log, port, started = folder / "cold-server.log", free_port(), time.monotonic()
    processes = [launch(
        [str(BIN / "fl-server"), "--config", str(run), "--insecure", "--host", "127.0.0.1",
         "--port", str(port), "--out", str(folder / "cold"), "--threads", "1"], log,
    )]  # fmt: skip
    try:
        for site in SITES:
            processes.append(launch(
                [str(BIN / "fl-client"), "--insecure", "--id", str(site), "--server", f"127.0.0.1:{port}",
                 "--task", str(folder / "task.py"), "--data", str(folder / f"site-{site}.npz"),
                 "--threads", "1", "--connect-timeout", "120"], folder / f"cold-client-{site}.log",
            ))  # fmt: skip
        return wait_for(log, f"round 1/{rounds}", 300) - started
    finally:
        for process in processes:
            process.wait(timeout=300)


def standing(folder: Path, run: Path, rounds: int) -> tuple[float, float]:
    """A federation and three agents, up and idle: seconds to round 1 for a first and a warm job."""
    digest = subprocess.run(
        [str(BIN / "fl-server"), "--hash-token", "bench-token"], capture_output=True, text=True, check=True
    ).stdout.strip()
    (folder / "admins.json").write_text(json.dumps({"admins": {"bench": digest}}))
    log = folder / "federation.log"
    processes = [launch(
        [str(BIN / "fl-server"), "--federation", str(folder / "fed"), "--insecure", "--host", "127.0.0.1",
         "--port", "0", "--admin-tokens", str(folder / "admins.json"), "--threads", "1"], log,
    )]  # fmt: skip
    try:
        wait_for(log, "listening on port", 120)
        port = re.search(r"listening on port (\d+)", log.read_text()).group(1)  # type: ignore[union-attr]
        for site in SITES:
            agent_log = folder / f"agent-{site}.log"
            processes.append(launch(
                [str(BIN / "fl-client"), "--insecure", "--id", str(site), "--server", f"127.0.0.1:{port}",
                 "--serve", "--policy", str(folder / f"site-{site}.toml"), "--threads", "1"], agent_log,
            ))  # fmt: skip
            wait_for(agent_log, "waiting for a run", 120)  # up and idle: its tasks imported
        times = []
        for job in ("job-1", "job-2"):
            submitted = time.monotonic()
            subprocess.run(
                [str(BIN / "fl-job"), "--insecure", "--server", f"127.0.0.1:{port}", "submit", str(run)],
                check=True, capture_output=True, env=ENV,
            )  # fmt: skip
            times.append(
                wait_for(folder / "fed/jobs" / job / "server.log", f"round 1/{rounds}", 300) - submitted
            )
            wait_for(log, f"{job} finished", 300)
        return times[0], times[1]
    finally:
        for process in processes:
            process.kill()
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--retry-max", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("standing.json"))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="standing-bench-"))
    run = prepare(folder, args.rounds, args.retry_max)
    cold_s = cold(folder, run, args.rounds)
    first_s, warm_s = standing(folder, run, args.rounds)
    rows = {"cold: fl-server + 3 fl-client started": cold_s, "standing: first job, agents idle": first_s,
            "standing: next job, agents warm": warm_s}  # fmt: skip
    print(f"{'seconds to round 1':<44} {'s':>6}")
    for name, seconds in rows.items():
        print(f"{name:<44} {seconds:>6.2f}")
    result = {
        "rounds": args.rounds, "retry_max_s": args.retry_max, "cold_s": round(cold_s, 2),
        "standing_first_s": round(first_s, 2), "standing_warm_s": round(warm_s, 2), "folder": str(folder),
    }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
