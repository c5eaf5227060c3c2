"""The reference job, networked and in-process, timed in the same run.

    python bench/reference_run.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--rounds 10]

1. In-process baseline (its first half of rounds before the networked run, the rest after):
   one process trains the 3 clients one after another each round,
   each from the global weights with a freshly built and compiled model and optimizer (as
   the reference script does), averages them (FedAvg) and evaluates on the test set.
2. Networked: `fl-local`, i.e. a real fl-server and 3 real fl-client processes over gRPC on
   loopback, same data, same split, same model.

Prints a table of per-round accuracy and seconds for both and writes JSON
(bench/results/reference_run.json). Targets: networked accuracy >= 0.67 after round 10,
networked round time <= 1.0x the in-process round time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def in_process(data: str, rounds: int, clients: int, seed: int, init_seed: int) -> Iterator[dict[str, float]]:
    """The reference job in one process, one round per `next()`."""
    import keras
    from fedgrpc.common.config import RunSpec
    from fedgrpc.common.data import load_split, model_inputs
    from fedgrpc.common.models import reference_cnn
    from fedgrpc.common.partition import shard_indices
    from fedgrpc.server.aggregate import weighted_mean

    spec = RunSpec(rounds=rounds, num_clients=clients, partition_seed=seed)
    train, test = load_split(data, "train"), load_split(data, "test")
    shards = [
        model_inputs(train.subset(shard_indices(len(train), clients, k, seed)), 10) for k in range(clients)
    ]
    x_test, y_test = model_inputs(test, 10)
    keras.utils.set_random_seed(init_seed)
    global_model = reference_cnn()
    weights = global_model.get_weights()
    for number in range(1, rounds + 1):
        started = time.monotonic()
        updates = []
        for x, y in shards:
            local = reference_cnn()  # fresh model and Adam every round, as the reference does
            local.set_weights(weights)
            local.fit(x, y, batch_size=spec.batch_size, epochs=spec.local_epochs, shuffle=True, verbose=0)
            updates.append((local.get_weights(), len(x)))
        weights = weighted_mean(updates)
        global_model.set_weights(weights)
        loss, accuracy = global_model.evaluate(x_test, y_test, batch_size=256, verbose=0)
        seconds = time.monotonic() - started
        print(f"  in-process round {number}/{rounds}  acc {accuracy:.4f}  {seconds:.1f} s", flush=True)
        keras.backend.clear_session()
        yield {"round": number, "accuracy": float(accuracy), "loss": float(loss), "seconds": seconds}


def networked(
    data: str, rounds: int, clients: int, seed: int, init_seed: int, work: Path, observe: bool = False
) -> tuple[list[dict[str, Any]], float]:
    from fedgrpc.server.local import run_federation

    out = work / "networked"
    started = time.monotonic()
    code = run_federation(
        clients=clients,
        rounds=rounds,
        data=data,
        out_dir=out,
        server_args=[
            *("--partition-seed", str(seed), "--init-seed", str(init_seed)),
            *(("--http", "0", "--tensorboard", str(work / "tensorboard")) if observe else ()),
        ],
        logs_dir=work / "logs",
    )
    wall = time.monotonic() - started
    if code != 0:
        for log in sorted((work / "logs").glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise SystemExit("the networked run failed")
    document = json.loads((out / "history.json").read_text())
    return [{**r, **r["central"]} for r in document["rounds"]], wall  # accuracy, loss at the top


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--seed", type=int, default=42, help="partition seed")
    p.add_argument("--init-seed", type=int, default=0)
    p.add_argument(
        "--backend",
        choices=("tensorflow", "jax", "torch"),
        default=os.environ.get("KERAS_BACKEND", "tensorflow"),
        help="the Keras backend of both runs (default: $KERAS_BACKEND, else tensorflow)",
    )
    p.add_argument(
        "--observe",
        action="store_true",
        help="the networked run with --http (dashboard, /metrics) and --tensorboard",
    )
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "reference_run.json")
    args = p.parse_args()
    if not Path(args.data).exists():
        raise SystemExit(f"no data at {args.data}; pass --data")
    os.environ["KERAS_BACKEND"] = args.backend  # before Keras is imported, here and in every process

    from fedgrpc.common.data import load_split

    load_split(args.data, "test")  # decode (or find) the cache before anything is timed

    with tempfile.TemporaryDirectory(prefix="fedgrpc-bench-") as tmp:
        # In-process rounds before and after the networked run (ABBA), so that the machine's load,
        # which drifts over the minutes of a run, weighs on both sides alike.
        print("in-process baseline: one process, clients trained one after another", flush=True)
        baseline = in_process(args.data, args.rounds, args.clients, args.seed, args.init_seed)
        base = [next(baseline) for _ in range(args.rounds // 2)]
        print(f"networked: fl-server + {args.clients} fl-client processes over gRPC on loopback", flush=True)
        net, net_wall = networked(
            args.data, args.rounds, args.clients, args.seed, args.init_seed, Path(tmp), args.observe
        )
        print("in-process baseline, remaining rounds", flush=True)
        base += list(baseline)

    rows = []
    print()
    print(
        f"{'round':>5} | {'acc in-proc':>11} {'acc net':>8} | {'s in-proc':>9} {'s net':>7} {'ratio':>6} | "
        f"{'up MB':>6} {'down MB':>7}"
    )
    print("-" * 78)
    for b, n in zip(base, net, strict=True):
        ratio = n["seconds"] / b["seconds"]
        rows.append({"round": b["round"], "inprocess": b, "networked": n, "ratio": ratio})
        print(
            f"{b['round']:>5} | {b['accuracy']:>11.4f} {n['accuracy']:>8.4f} | "
            f"{b['seconds']:>9.1f} {n['seconds']:>7.1f} {ratio:>6.2f} | "
            f"{n['bytes_in'] / 1e6:>6.2f} {n['bytes_out'] / 1e6:>7.2f}"
        )
    base_total = sum(b["seconds"] for b in base)
    net_total = sum(n["seconds"] for n in net)
    summary = {
        "final_accuracy_inprocess": base[-1]["accuracy"],
        "final_accuracy_networked": net[-1]["accuracy"],
        "median_round_s_inprocess": statistics.median(b["seconds"] for b in base),
        "median_round_s_networked": statistics.median(n["seconds"] for n in net),
        "total_round_s_inprocess": base_total,
        "total_round_s_networked": net_total,
        "ratio_total": net_total / base_total,
        "networked_wall_s_with_startup": net_wall,
        "targets": {
            "final_accuracy_networked>=0.67": net[-1]["accuracy"] >= 0.67,
            "ratio_total<=1.0": net_total <= base_total,
        },
    }
    print("-" * 78)
    print(
        f"total | {'':>11} {'':>8} | {base_total:>9.1f} {net_total:>7.1f} {net_total / base_total:>6.2f} |"
        f"  (networked wall incl. process start: {net_wall:.1f} s)"
    )
    print(f"final accuracy: networked {net[-1]['accuracy']:.4f}, in-process {base[-1]['accuracy']:.4f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "config": vars(args) | {"json": str(args.json)},
                "rounds": rows,
                "summary": summary,
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")
    return 0 if all(summary["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
