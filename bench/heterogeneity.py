"""Strategies under data skew: FedAvg, FedAvgM, FedProx, FedAdam and SCAFFOLD on IID and
Dirichlet(0.1) CIFAR-10.

    python bench/heterogeneity.py [--rounds 30] [--clients 10] [--per-round 5]
        [--partitions iid dirichlet:0.1] [--strategies fedavg fedavgm fedprox fedadam scaffold]
        [--data PATH] [--quick]

--quick is a sanity check, not a measurement: 5 rounds, 4 clients, 2 a round, dirichlet:0.1
only, fedavg, fedprox, fedadam and scaffold (about 80 s a run); a flag given beside it wins
(--quick --rounds 2). Five rounds, as SCAFFOLD's plain SGD starts slower than Adam.
SCAFFOLD's clients keep their control variates in a state folder inside the run's temporary
folder ($FL_STATE_DIR). The reference task trains with Adam (lr 1e-3); under SCAFFOLD the
local steps are plain SGD at SCAFFOLD's local learning rate, 0.05 by default (its option II
control variates assume SGD steps: fedgrpc.client.scaffold).

Each (partition, strategy) is one real run: fl-server + --clients fl-client processes (the
reference CNN, the built-in cifar10 task, 1 local epoch), --per-round clients sampled each
round with the same sample and partition seeds in every run, so runs differ only by strategy.
Accuracy is the server's central evaluation on the 10,000 test images. Prints accuracy by
round for every run, writes JSON and a plot (bench/results/heterogeneity.{json,png}).
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
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
#: Each strategy's flags: the documented defaults, named so the table says what ran.
STRATEGY_FLAGS = {
    "fedavg": ["--strategy", "fedavg"],
    "fedavgm": ["--strategy", "fedavgm"],
    "fedprox": ["--strategy", "fedprox"],
    "fedadam": ["--strategy", "fedadam"],
    "fedyogi": ["--strategy", "fedyogi"],
    "fedadagrad": ["--strategy", "fedadagrad"],
    "scaffold": ["--strategy", "scaffold"],
}
QUICK = {
    "rounds": 5,
    "clients": 4,
    "per_round": 2,
    "partitions": ["dirichlet:0.1"],
    "strategies": ["fedavg", "fedprox", "fedadam", "scaffold"],
}

DEFAULTS = {
    "rounds": 30,
    "clients": 10,
    "per_round": 5,
    "partitions": ["iid", "dirichlet:0.1"],
    "strategies": ["fedavg", "fedavgm", "fedprox", "fedadam", "scaffold"],
}


def run(partition: str, strategy: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from fedgrpc.server.local import run_federation

    name = f"{partition.replace(':', '-')}-{strategy}"
    out, logs = work / name, work / f"{name}-logs"
    started = time.monotonic()
    code = run_federation(
        clients=args.clients,
        rounds=args.rounds,
        data=str(args.data),
        out_dir=out,
        server_args=[
            *STRATEGY_FLAGS[strategy],
            *("--partition", partition, "--partition-seed", "1", "--sample-seed", "1"),
            *("--clients-per-round", str(args.per_round), "--join-timeout", "600"),
            *args.server_args,
        ],
        logs_dir=logs,
    )
    if code != 0:
        for log in sorted(logs.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-2000:]}", file=sys.stderr)
        raise SystemExit(f"the run {name} failed")
    history = json.loads((out / "history.json").read_text())["rounds"]
    accuracy = [r["central"]["accuracy"] for r in history]
    seconds = time.monotonic() - started
    print(f"  {name:<28} final {accuracy[-1]:.4f}  best {max(accuracy):.4f}  ({seconds:.0f} s)", flush=True)
    return {
        "partition": partition,
        "strategy": strategy,
        "accuracy": accuracy,
        "seconds": time.monotonic() - started,
    }


def plot(results: list[dict[str, Any]], partitions: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(partitions), figsize=(5.5 * len(partitions), 4), squeeze=False)
    for axis, partition in zip(axes[0], partitions, strict=True):
        for result in (r for r in results if r["partition"] == partition):
            rounds = range(1, len(result["accuracy"]) + 1)
            axis.plot(rounds, result["accuracy"], label=result["strategy"])
        axis.set(title=f"CIFAR-10, partition {partition}", xlabel="round", ylabel="test accuracy")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--rounds", type=int)
    p.add_argument("--clients", type=int)
    p.add_argument("--per-round", type=int)
    p.add_argument("--partitions", nargs="+")
    p.add_argument("--strategies", nargs="+", choices=sorted(STRATEGY_FLAGS))
    p.add_argument(
        "--quick",
        action="store_true",
        help="a sanity check: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()),
    )
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "heterogeneity.json")
    p.add_argument("server_args", nargs="*", help="after --: more fl-server flags for every run")
    args = p.parse_args()
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:  # a flag given beside --quick wins
            setattr(args, key, value)
    if args.quick:
        args.json = args.json.with_name(args.json.stem + "-quick.json")  # the measured results stay
    if not args.data.exists():
        raise SystemExit(f"no data at {args.data}; pass --data")
    from fedgrpc.common.data import load_split

    load_split(str(args.data), "test")  # decode (or find) the cache once, before the runs
    results = []
    with tempfile.TemporaryDirectory(prefix="fedgrpc-heterogeneity-") as tmp:
        os.environ["FL_STATE_DIR"] = str(Path(tmp) / "state" / "client-{id}")  # the clients inherit it
        for partition in args.partitions:
            for strategy in args.strategies:
                results.append(run(partition, strategy, args, Path(tmp)))

    marks = sorted({*range(5, args.rounds + 1, 5), args.rounds})
    print()
    print(f"test accuracy by round ({args.clients} clients, {args.per_round} a round, 1 local epoch)")
    print(
        f"{'partition':<14} {'strategy':<9} | " + " ".join(f"{'r' + str(m):>6}" for m in marks) + " |   best"
    )
    print("-" * (28 + 7 * len(marks) + 9))
    for r in results:
        row = " ".join(f"{r['accuracy'][m - 1]:>6.3f}" for m in marks)
        print(f"{r['partition']:<14} {r['strategy']:<9} | {row} | {max(r['accuracy']):>6.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    plot(results, args.partitions, args.json.with_suffix(".png"))
    print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
