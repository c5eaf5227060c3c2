"""fl-sim on Ray against fl-local's OS processes, and how many simulated clients one machine holds.

    python bench/sim.py [--data PATH] [--rounds 10] [--sizes 1000 2000 5000] [--skip-reference]

Reference CNN on the shared CIFAR-10 copy, 1 local epoch, batch 32:

- fl-sim, 100 clients, 10 sampled a round (Ray actors of 1 CPU: two on two cores);
- fl-sim, 10 clients, all of them every round;
- fl-local, the same 10-client run with 10 OS processes (one per client, taking turns).

Then fl-sim with bench/tasks/tiny.py (a 20-feature logistic regression, 32 examples a client,
really trained) for each of --sizes clients, 100 sampled a round, 3 rounds: the round time, the
server's peak RSS, its threads and open files, and the machine's memory in use at its highest.

Per run: wall time, mean round seconds (the server's), final accuracy, and the machine's
peak memory in use above what it was before the run (every process: server, clients, Ray).
Prints a table and writes JSON (bench/results/sim.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
TINY = ROOT / "bench" / "tasks" / "tiny.py"


def _memory_in_use() -> int:
    fields = {
        line.split(":")[0]: int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
    }
    return fields["MemTotal"] - fields["MemAvailable"]


def _server_pid() -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"fedgrpc.server.cli" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except OSError:
                continue
    return None


class Watcher:
    """Samples the machine's memory in use and the server's RSS, threads and open files."""

    def __init__(self) -> None:
        self.baseline = _memory_in_use()
        self.peak = {"memory": 0, "server_rss": 0, "server_threads": 0, "server_fds": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pid = None
        while not self._stop.is_set():
            self.peak["memory"] = max(self.peak["memory"], _memory_in_use() - self.baseline)
            pid = pid or _server_pid()
            if pid is not None:
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak["server_rss"] = max(
                                self.peak["server_rss"], int(line.split()[1]) * 1024
                            )
                        if line.startswith("Threads:"):
                            self.peak["server_threads"] = max(
                                self.peak["server_threads"], int(line.split()[1])
                            )
                    self.peak["server_fds"] = max(self.peak["server_fds"], len(os.listdir(f"/proc/{pid}/fd")))
                except OSError:
                    pid = None
            time.sleep(0.5)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def run(name: str, command: list[str], out: Path, work: Path, timeout: float = 3600) -> dict[str, Any]:
    print(f"{name} ...", flush=True)
    watcher = Watcher()
    started = time.monotonic()
    log = work / f"{name.replace(' ', '_')}.log"
    try:
        code = subprocess.run(
            command, stdout=log.open("w"), stderr=subprocess.STDOUT, timeout=timeout
        ).returncode
    except subprocess.TimeoutExpired:
        code = -1
    wall = time.monotonic() - started
    peak = watcher.stop()
    history = out / "history.json"
    rounds = json.loads(history.read_text())["rounds"] if history.exists() else []
    if code != 0 or not rounds:  # measured too: where the machine gives out
        errors = [
            line
            for line in log.read_text(errors="replace").splitlines()
            if "could not" in line or "rror" in line
        ]
        print(f"  failed ({code}): {errors[-1][-200:] if errors else 'see ' + str(log)}", flush=True)
        return {"run": name, "failed": errors[-1][-300:] if errors else f"exit {code}", "wall_s": wall,
                "round_s": float("nan"), "trained_per_round": 0, "accuracy": None,
                "peak_memory_MB": peak["memory"] / 1e6, "server_rss_MB": peak["server_rss"] / 1e6,
                "server_threads": peak["server_threads"], "server_fds": peak["server_fds"]}  # fmt: skip
    last = rounds[-1]
    accuracy = (last.get("central") or {}).get("accuracy")
    return {
        "run": name,
        "wall_s": wall,
        "round_s": statistics.fmean(r["seconds"] for r in rounds),
        "trained_per_round": len(last["clients"]),
        "accuracy": accuracy,
        "peak_memory_MB": peak["memory"] / 1e6,
        "server_rss_MB": peak["server_rss"] / 1e6,
        "server_threads": peak["server_threads"],
        "server_fds": peak["server_fds"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=[1000, 2000, 5000],
        help="tiny-task sizes (none: only the reference runs)",
    )
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "sim.json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedgrpc-sim-") as tmp:
        work = Path(tmp)
        common = ["--rounds", str(args.rounds), "--data", str(args.data)]
        if not args.skip_reference:
            sim = [str(BIN / "fl-sim"), *common]
            runs = [
                ("fl-sim 100 clients, 10 a round", [*sim, "--clients", "100", "--clients-per-round", "10"]),
                ("fl-sim 10 clients", [*sim, "--clients", "10"]),
                ("fl-local 10 clients", [str(BIN / "fl-local"), *common, "--clients", "10"]),
            ]
            for index, (name, command) in enumerate(runs):
                out = work / f"run-{index}"
                rows.append(run(name, [*command, "--out", str(out)], out, work))
        for n in args.sizes:
            out = work / f"tiny-{n}"
            command = [
                str(BIN / "fl-sim"), "--clients", str(n), "--clients-per-round", "100", "--rounds", "3",
                "--task", str(TINY), "--out", str(out), "--", "--eval-every", "0",
            ]  # fmt: skip
            rows.append(run(f"fl-sim {n} tiny clients, 100 a round", command, out, work, timeout=900))
            if "failed" in rows[-1]:
                break  # the larger sizes only fail the same way, later
    columns = (
        "run",
        "wall s",
        "round s",
        "trained",
        "accuracy",
        "peak mem MB",
        "server RSS MB",
        "threads",
        "fds",
    )
    line = "{:<36} {:>7} {:>8} {:>7} {:>8} {:>11} {:>13} {:>7} {:>6}"
    print("\n" + line.format(*columns) + "\n" + "-" * 105)
    for r in rows:
        print(
            line.format(
                r["run"],
                f"{r['wall_s']:.0f}",
                f"{r['round_s']:.2f}",
                r["trained_per_round"],
                "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}",
                f"{r['peak_memory_MB']:.0f}",
                f"{r['server_rss_MB']:.0f}",
                r["server_threads"],
                r["server_fds"],
            )  # fmt: skip
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = vars(args) | {"json": str(args.json), "data": str(args.data)}
    args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
