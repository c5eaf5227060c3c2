"""What privacy costs: secure aggregation's time and bytes, and DP's accuracy and epsilon.

    python bench/privacy.py [--sizes 3 20 100] [--rounds 3] [--noise 0 0.5 1 2] [--skip-dp]
    python bench/privacy.py --offender --sizes 4 5 6 --rounds 5 --skip-dp

SecAgg: fl-server with a 1 MiB model (bench/tasks/sized.py, one dense layer of 262,144
float32 weights) and N light clients (threads in 4 processes, the real client code), plain
and with --secagg, each with and without one client that vanishes in the last round (plain:
after fetching the weights; secagg: after sharing its keys, the costliest place, since its
pairwise masks must then be rebuilt and removed). Per variant:

- round time: the server's own per-round seconds (no-dropout: mean of rounds 2..R; dropout:
  round R, which closes at --round-timeout and is reported with it);
- bytes per client and round: the protobuf bytes of every message each client sent and
  received (Connection.traffic: every call, keys and shares included; gRPC's framing not),
  over the clients that stayed, divided by their rounds;
- client CPU per client and round (keys, shares, masks), and the server's unmasking time.

With --offender, instead: secure aggregation with and without one client (the last id) that
masks an impossible example count every round, to measure what isolating it costs: the rounds
until it is excluded, the attempts whose sum was impossible, the rounds lost (fewer than six
clients: each impossible sum loses its round), the honest updates left out meanwhile (lost
rounds, spoiled groups, suspects sitting out), the smallest group whose sum a round used, and
the round times (fedgrpc.server.isolation).

DP: examples/hospitals (4 hospitals, no data on the server) for --dp-rounds rounds with
DP-FedAvg under secure aggregation, clients clipping to --dp-clip, at each --noise multiplier;
accuracy on every hospital's held-out patients and the epsilon reached (delta 1e-5).

Prints both tables and writes JSON (bench/results/privacy.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SIZED = ROOT / "bench" / "tasks" / "sized.py"
WORKERS = 4
DROPOUT_TIMEOUT_S = 3.0


def _clients(target: str, ids: list[int], vanish: int, results: Any) -> None:
    """Light clients `ids` as threads; `vanish` (0: none) leaves in the last round."""
    from fedgrpc.client.light import run_light_client

    cpu0 = time.process_time()
    with futures.ThreadPoolExecutor(max_workers=len(ids)) as pool:
        leaving = pool.submit(_vanishing_client, target, vanish) if vanish in ids else None
        done = [pool.submit(run_light_client, target, i, connect_timeout_s=300) for i in ids if i != vanish]
        stats = [f.result() for f in done]
        if leaving is not None:
            leaving.result()
    results.put(
        {"vanish": vanish in ids, "rounds": sum(s.rounds for s in stats), "cpu_s": time.process_time() - cpu0,
         "sent": sum(s.traffic_sent for s in stats), "received": sum(s.traffic_received for s in stats)}
    )  # fmt: skip


def _vanishing_client(target: str, client_id: int) -> None:
    """A light client that takes part until the last round, then goes silent mid-round (its
    connection stays open, as a hung client's would)."""
    from fedgrpc.client.connection import Connection
    from fedgrpc.client.light import light_examples, light_update
    from fedgrpc.client.secagg import SecureRound
    from fedgrpc.common.protocol import Instruction

    connection = Connection(target, client_id, connect_timeout_s=300)
    run, _ = connection.join()
    last = 0
    while True:
        task = connection.next_task(last)
        if task.instruction is not Instruction.TRAIN:
            if task.instruction is Instruction.FINISHED:
                return None
            continue
        secure = SecureRound(connection, run, task.round) if run.secagg else None
        if secure is not None:
            secure.share_keys()
        if task.round == run.rounds:
            return None  # vanishes: after sharing its keys, or after fetching the weights
        update = light_update(task.weights, client_id, task.round)
        if secure is not None:
            examples = light_examples(client_id)
            secure.submit(task.round, task.specs, update, examples, {}, reference=task.weights)
            secure.reveal()
        else:
            connection.submit(task.round, task.specs, update, light_examples(client_id), {})
        last = task.round


def _offender(target: str, client_id: int, results: Any) -> None:
    """A light client whose masked example count is 2^30 (no possible sum) every round."""
    import numpy as np
    from fedgrpc.client.light import run_light_client
    from fedgrpc.common import secagg as sa

    original = sa.encode

    def encode(*args: Any, **kw: Any) -> list[Any]:
        words = original(*args, **kw)
        words[-1] = np.array([1 << 30], np.uint32)
        return words

    sa.encode = encode
    cpu0 = time.process_time()
    stats = run_light_client(target, client_id, connect_timeout_s=300)
    results.put({"vanish": True, "rounds": stats.rounds, "cpu_s": time.process_time() - cpu0,
                 "sent": stats.traffic_sent, "received": stats.traffic_received})  # fmt: skip


def secagg_run(
    n: int, rounds: int, secure: bool, dropout: bool, work: Path, offender: bool = False
) -> dict[str, Any]:
    from fedgrpc.common.processes import free_port

    port, out = free_port(), work / f"out-{n}-{secure}-{dropout}-{offender}"
    command = [
        str(BIN / "fl-server"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
        "--rounds", str(rounds), "--clients", str(n), "--out", str(out), "--threads", "1",
        "--task", str(SIZED), "--eval-every", "0", "--join-timeout", "600", "--finish-grace", "1",
        "--secagg-timeout", "30",
    ]  # fmt: skip
    if secure:
        command.append("--secagg")
    if dropout:
        command += ["--round-timeout", str(DROPOUT_TIMEOUT_S), "--min-clients", str(n - 1)]
    log = work / f"server-{n}-{secure}-{dropout}-{offender}.log"
    server = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    context = mp.get_context("spawn")
    results = context.Queue()
    ids = list(range(1, n + (0 if offender else 1)))
    vanish = n if dropout else 0
    workers = [
        context.Process(target=_clients, args=(f"127.0.0.1:{port}", ids[k::WORKERS], vanish, results))
        for k in range(min(WORKERS, len(ids)))
    ]
    if offender:  # its own process: it replaces the encoding of every client in its process
        workers.append(context.Process(target=_offender, args=(f"127.0.0.1:{port}", n, results)))
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=1800) for _ in workers]
    for worker in workers:
        worker.join()
    code = server.wait(timeout=300)
    if code != 0:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"fl-server exited {code}")
    history = json.loads((out / "history.json").read_text())["rounds"]
    measured = [r for r in reports if not r["vanish"]]  # the vanishing client's process is left out
    client_rounds = sum(r["rounds"] for r in measured)
    timed = history[-1:] if dropout else history[1:] or history
    row = {
        "clients": n,
        "secagg": secure,
        "dropout": dropout,
        "round_s": statistics.fmean(r["seconds"] for r in timed),
        "kB_up_per_client_round": sum(r["sent"] for r in measured) / client_rounds / 1e3,
        "kB_down_per_client_round": sum(r["received"] for r in measured) / client_rounds / 1e3,
        "client_cpu_ms_per_round": 1e3 * sum(r["cpu_s"] for r in measured) / client_rounds,
        "counted_last_round": len(history[-1]["clients"]),  # 0: the last round was lost
    }
    if secure:
        used = next(
            (r for r in reversed(history) if "lost" not in r), history[-1]
        )  # a lost one unmasked less
        row["neighbours"] = used["secagg"]["neighbours"]
        row["unmask_s"] = used["secagg"]["unmask_seconds"]
        row["key_steps_s"] = used["secagg"]["key_seconds"]
    if offender:
        text = log.read_text()
        marker = f"client {n} is left out of secure aggregation"
        lines = [line for line in text.splitlines() if marker in line]
        excluded = [int(line.split("round ")[1].split(":")[0]) for line in lines]
        counted = [len(r["clients"]) for r in history]
        row |= {
            "offender": True,
            "excluded_in_round": excluded[0] if excluded else None,
            "impossible_sums": text.count("group sum(s) impossible"),  # one line per such attempt
            "rounds_lost": sum(1 for r in history if "lost" in r),
            "honest_updates_lost": (n - 1) * len(history) - sum(counted),
            "smallest_sum_learned": min((c for c in counted if c), default=0),
            "round_s_each": [r["seconds"] for r in history],
        }
    return row


def dp_run(
    noise: float, clip: float, rounds: int, work: Path, files_pattern: str, splits: Any
) -> dict[str, Any]:
    import keras
    from fedgrpc.server.local import run_federation

    sys.path.insert(0, str(ROOT / "bench"))
    from hospitals import SITES, TASK, accuracies

    out = work / f"dp-{noise}"
    private = ["--secagg", "--dp-clip", str(clip), "--dp-noise-multiplier", str(noise)] if noise else []
    code = run_federation(
        clients=SITES, rounds=rounds, data=files_pattern, out_dir=out, task=str(TASK),
        server_args=["--local-epochs", "5", "--batch-size", "16", "--eval-every", "0", *private],
        logs_dir=work / f"logs-dp-{noise}",
    )  # fmt: skip
    if code != 0:
        raise SystemExit(f"the DP run with noise {noise} failed (logs in {work})")
    history = json.loads((out / "history.json").read_text())["rounds"]
    model = keras.models.load_model(out / "final_model.keras")
    privacy = history[-1].get("privacy") or {}
    return {
        "noise_multiplier": noise,
        "clip": clip if noise else None,
        "accuracy_all": accuracies(model, splits)["all"],
        "epsilon": privacy.get("epsilon", float("inf")),
        "rounds": len(history),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[3, 20, 100])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.3, 0.5, 1.0, 2.0])
    p.add_argument("--dp-clip", type=float, default=1.0)
    p.add_argument("--dp-rounds", type=int, default=10)
    p.add_argument("--skip-dp", action="store_true")
    p.add_argument("--skip-secagg", action="store_true")
    p.add_argument("--offender", action="store_true", help="measure isolating an offender (see above)")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "privacy.json")
    args = p.parse_args()
    secagg_rows: list[dict[str, Any]] = []
    dp_rows: list[dict[str, Any]] = []
    offender_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedgrpc-privacy-") as tmp:
        work = Path(tmp)
        if args.offender:
            for n in args.sizes:
                for bad in (False, True):
                    print(f"{n} clients, secagg{', one offender' if bad else ''} ...", flush=True)
                    offender_rows.append(secagg_run(n, args.rounds, True, False, work, offender=bad))
            print("\nsecure aggregation with one client masking an impossible count every round")
            print(f"{'clients':>7} {'offender':>8} {'excluded in round':>17} {'impossible sums':>15} "
                  f"{'rounds lost':>11} {'honest lost':>11} {'smallest sum':>12}  round seconds")  # fmt: skip
            for row in offender_rows:
                smallest = row.get("smallest_sum_learned", row["counted_last_round"])
                print(f"{row['clients']:>7} {'yes' if row.get('offender') else 'no':>8} "
                      f"{row.get('excluded_in_round') or '-':>17} {row.get('impossible_sums', 0):>15} "
                      f"{row.get('rounds_lost', 0):>11} {row.get('honest_updates_lost', 0):>11} "
                      f"{smallest:>12}  "
                      f"{row.get('round_s_each', round(row['round_s'], 2))}")  # fmt: skip
        elif not args.skip_secagg:
            for n in args.sizes:
                for dropout in (False, True):
                    for secure in (False, True):
                        print(f"{n} clients, {'secagg' if secure else 'plain'}"
                              f"{', one dropout' if dropout else ''} ...", flush=True)  # fmt: skip
                        secagg_rows.append(secagg_run(n, args.rounds, secure, dropout, work))
        if not args.skip_dp:
            sys.path.insert(0, str(ROOT / "examples" / "hospitals"))
            sys.path.insert(0, str(ROOT / "bench"))
            from fedgrpc.common.task_loader import load_task
            from hospitals import TASK, held_out_sets
            from make_sites import write_sites

            files = write_sites(work / "data")
            splits = held_out_sets(load_task(str(TASK)), files)
            pattern = str(work / "data" / "hospital_{id}.csv")
            for noise in args.noise:
                print(f"hospitals, noise multiplier {noise} ...", flush=True)
                dp_rows.append(dp_run(noise, args.dp_clip, args.dp_rounds, work, pattern, splits))

    if secagg_rows:
        print("\nsecure aggregation, 1 MiB model, light clients on loopback (2 cores shared by all)")
        header = (f"{'clients':>7} {'mode':<18} {'round s':>8} {'kB up/cl':>9} {'kB down/cl':>10} "
                  f"{'up vs plain':>11} {'cpu ms/cl':>9} {'unmask s':>8} {'nbrs':>5}")  # fmt: skip
        print(header)
        print("-" * len(header))
        cells = "{:>7} {:<18} {:>8.2f} {:>9.0f} {:>10.0f} {:>10.3f}x {:>9.0f} {:>8.2f} {:>5}"
        for row in secagg_rows:
            plain = next(
                r for r in secagg_rows
                if r["clients"] == row["clients"] and r["dropout"] == row["dropout"] and not r["secagg"]
            )  # fmt: skip
            row["up_vs_plain"] = row["kB_up_per_client_round"] / plain["kB_up_per_client_round"]
            row["total_vs_plain"] = (row["kB_up_per_client_round"] + row["kB_down_per_client_round"]) / (
                plain["kB_up_per_client_round"] + plain["kB_down_per_client_round"]
            )
            mode = ("secagg" if row["secagg"] else "plain") + (" +1 dropout" if row["dropout"] else "")
            print(
                cells.format(
                    row["clients"],
                    mode,
                    row["round_s"],
                    row["kB_up_per_client_round"],
                    row["kB_down_per_client_round"],
                    row["up_vs_plain"],
                    row["client_cpu_ms_per_round"],
                    row.get("unmask_s", 0),
                    row.get("neighbours", 0),
                )  # fmt: skip
            )
        print(f"(dropout rounds close at --round-timeout {DROPOUT_TIMEOUT_S:g} s)")
    if dp_rows:
        print(
            f"\nDP-FedAvg under secure aggregation, hospitals, {args.dp_rounds} rounds, clip {args.dp_clip}"
        )
        print(f"{'noise multiplier':>16} {'accuracy':>9} {'epsilon (delta 1e-5)':>21}")
        for row in dp_rows:
            eps = "no DP" if not row["noise_multiplier"] else f"{row['epsilon']:.2f}"
            print(f"{row['noise_multiplier']:>16g} {row['accuracy_all']:>9.4f} {eps:>21}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    rows = {"secagg": secagg_rows, "dp": dp_rows, "offender": offender_rows}
    args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, **rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
