"""What update compression saves and what it costs, on the reference job.

    python bench/compression.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--rounds 10]
                                [--methods none fp16 int8]

Runs the reference job through `fl-local` (a real fl-server and 3 fl-client processes on
loopback) once per `--compression` method, same data, split and initial weights, and prints
per method: bytes sent up per round, the saving against `none`, and the test accuracy after
each round. Writes JSON (bench/results/compression.json).

What to expect from the arithmetic: fp16 halves and int8 quarters the update bytes (the
weights sent down are unchanged); each sends the update's difference from the global
weights, scaled per tensor, so the error per value is at most 1/2048 (fp16) or 1/254 (int8)
of that tensor's largest change in the round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def run(method: str, data: str, rounds: int, clients: int, work: Path) -> dict[str, Any]:
    from fedgrpc.server.local import run_federation

    out, logs = work / method, work / f"{method}-logs"
    started = time.monotonic()
    code = run_federation(
        clients=clients,
        rounds=rounds,
        data=data,
        out_dir=out,
        server_args=["--compression", method],
        logs_dir=logs,
    )
    if code != 0:
        for log in sorted(logs.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise SystemExit(f"the run with --compression {method} failed")
    history = json.loads((out / "history.json").read_text())["rounds"]
    flat = [{**r, **r["central"]} for r in history]  # accuracy, loss at the top
    return {"method": method, "wall_s": time.monotonic() - started, "rounds": flat}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=["none", "fp16", "int8"])
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "compression.json")
    args = p.parse_args()
    if not Path(args.data).exists():
        raise SystemExit(f"no data at {args.data}; pass --data")

    results = []
    with tempfile.TemporaryDirectory(prefix="fedgrpc-compression-") as tmp:
        for method in args.methods:
            print(f"--compression {method}: fl-server + {args.clients} fl-client processes", flush=True)
            results.append(run(method, args.data, args.rounds, args.clients, Path(tmp)))

    baseline = next((r for r in results if r["method"] == "none"), results[0])
    base_up = sum(x["bytes_in"] for x in baseline["rounds"]) / len(baseline["rounds"])
    print()
    print(f"{'method':<6} | {'up MB/round':>11} {'x none':>7} | {'down MB/round':>13} | accuracy by round")
    print("-" * 100)
    for r in results:
        up = sum(x["bytes_in"] for x in r["rounds"]) / len(r["rounds"])
        down = sum(x["bytes_out"] for x in r["rounds"]) / len(r["rounds"])
        curve = " ".join(f"{x['accuracy']:.3f}" for x in r["rounds"])
        r |= {"up_bytes_per_round": up, "down_bytes_per_round": down, "up_x_none": up / base_up}
        r["final_accuracy"] = r["rounds"][-1]["accuracy"]
        print(f"{r['method']:<6} | {up / 1e6:>11.3f} {up / base_up:>7.2f} | {down / 1e6:>13.3f} | {curve}")
    print("-" * 100)
    for r in results:
        cost = r["final_accuracy"] - baseline["final_accuracy"]
        print(f"{r['method']:<6} final accuracy {r['final_accuracy']:.4f} ({cost:+.4f} against none)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"config": vars(args) | {"json": str(args.json)}, "runs": results}, indent=2)
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
