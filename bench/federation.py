"""A standing federation's costs: the coordinator's memory with jobs queued, and the time from
a job's submission to its first round.

    python bench/federation.py [--queued 3] [--rounds 3]

Starts `fl-server --federation` (insecure, an admin token) on loopback with three light
clients already waiting (they retry Join while no job runs, as a site's agent would), submits
1 + --queued jobs of the reference task (cifar10 on a synthetic set of 300 images) with
fl-job, and measures: seconds from the first submission to the first job's "round 1" line,
the coordinator's RSS (VmRSS) while that job runs and the others wait, and its peak (VmHWM).
Prints one JSON object.
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

BIN = Path(sys.executable).parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FL_ADMIN_TOKEN": "bench-token"}


def synthetic(path: Path) -> Path:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 255, size=(400, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=(400, 1), dtype=np.uint8)
    np.savez(path, x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])
    return path


def memory_kb(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM")}  # type: ignore[union-attr]


def wait_for(log: Path, text: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return time.monotonic()
        time.sleep(0.02)
    raise SystemExit(f"{text!r} not in {log} after {timeout} s:\n{log.read_text()[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queued", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fed-bench-"))
    data = synthetic(folder / "synthetic.npz")
    digest = subprocess.run(
        [str(BIN / "fl-server"), "--hash-token", "bench-token"], capture_output=True, text=True, check=True
    ).stdout.strip()
    (folder / "admins.json").write_text(json.dumps({"admins": {"bench": digest}}))
    run = folder / "run.toml"
    run.write_text(f'[run]\nclients = 3\nrounds = {args.rounds}\nbatch_size = 32\ndata = "{data}"\n')
    log = folder / "federation.log"
    server = subprocess.Popen(
        [str(BIN / "fl-server"), "--federation", str(folder / "fed"), "--insecure", "--host", "127.0.0.1",
         "--port", "0", "--admin-tokens", str(folder / "admins.json"), "--threads", "1"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip
    processes = [server]
    try:
        wait_for(log, "listening on port", 60)
        port = re.search(r"listening on port (\d+)", log.read_text()).group(1)  # type: ignore[union-attr]
        idle = memory_kb(server.pid)
        for k in (1, 2, 3):
            processes.append(subprocess.Popen(
                [str(BIN / "fl-client"), "--light", "--insecure", "--id", str(k),
                 "--server", f"127.0.0.1:{port}", "--data", str(data), "--threads", "1",
                 "--connect-timeout", "120"],
                stdout=(folder / f"client-{k}.log").open("wb"), stderr=subprocess.STDOUT, env=ENV,
            ))  # fmt: skip
        job = [str(BIN / "fl-job"), "--insecure", "--server", f"127.0.0.1:{port}"]
        submitted = time.monotonic()
        for _ in range(1 + args.queued):
            subprocess.run([*job, "submit", str(run)], check=True, capture_output=True, env=ENV)
        first_round = wait_for(log, f"round 1/{args.rounds}", 300)
        running = memory_kb(server.pid)
        print(json.dumps({
            "queued": args.queued,
            "submit_to_round_1_s": round(first_round - submitted, 2),
            "rss_idle_mb": round(idle["VmRSS"] / 1024, 1),
            "rss_one_running_queued_mb": round(running["VmRSS"] / 1024, 1),
            "peak_rss_mb": round(running["VmHWM"] / 1024, 1),
            "log": str(log),
        }, indent=1))  # fmt: skip
    finally:
        for process in processes:
            process.kill()
            process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
