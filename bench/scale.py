"""Many light clients (no TensorFlow) against one real fl-server on loopback.

    python bench/scale.py [--clients 1000] [--per-round K] [--rounds 1] [--workers 4]
        [--shared-channel] [--parameters N] [--compression none]

Starts `fl-server` (bench/tasks/sized.py: one dense layer of --parameters float32 weights,
the reference CNN's 0.67 MB by default, no data, no evaluation) for --rounds rounds of
--clients clients (K of them sampled a round with --per-round), and the light clients as
threads spread over --workers processes, each with its own gRPC channel (gRPC lets the
channels of one process to one server share its TCP connection), or with --shared-channel
one channel per process (one polling thread instead of one per client). Measures the round
times the server logs, each client's SubmitUpdate latency (p50, p99, max), the server's peak
RSS (VmHWM), its threads and open file descriptors at their highest, and checks the
aggregate of the last round: the server's weights against the example-weighted mean of what
every light client sent, recomputed here from (client id, round). Prints a table and writes
JSON (bench/results/scale.json).
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
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np

BIN = Path(sys.executable).parent
SIZED = Path(__file__).resolve().parent / "tasks" / "sized.py"  # a one-layer model of any size, no data


def _clients(target: str, ids: list[int], last_round: int, shared: bool, results: mp.Queue) -> None:  # type: ignore[type-arg]
    from fedgrpc.client.connection import ChannelSecurity, wake_waiting_calls_every
    from fedgrpc.client.light import run_light_client

    threading.stack_size(512 << 10)  # thousands of client threads: small stacks
    wake_waiting_calls_every(2.0)  # not ten times a second each
    keepers = set(ids[:50])  # clients that keep the weights they were sent, to check the last round
    channel = ChannelSecurity().channel(target) if shared else None

    def one(client_id: int) -> dict[str, Any]:
        stats = run_light_client(
            target, client_id, connect_timeout_s=600, keep_weights=client_id in keepers, channel=channel
        )
        return {
            "id": client_id,
            "rounds": stats.rounds,
            "submit_s": stats.submit_seconds,
            "last": stats.received.get(last_round),
        }

    with futures.ThreadPoolExecutor(max_workers=len(ids)) as pool:
        done = [f.result() for f in [pool.submit(one, i) for i in ids]]
    last = next((d["last"] for d in done if d["last"] is not None), None)
    for d in done:
        d.pop("last")
    results.put((done, None if last is None else [w.tolist() for w in last]))


def _peak_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """peak = [VmHWM bytes, most threads, most open file descriptors] of process `pid`."""
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
                if line.startswith("Threads:"):
                    peak[1] = max(peak[1], int(line.split()[1]))
            peak[2] = max(peak[2], len(os.listdir(f"/proc/{pid}/fd")))
        except OSError:
            return
        time.sleep(0.2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--per-round", type=int, default=None, help="--clients-per-round (default: all)")
    p.add_argument("--workers", type=int, default=4, help="client processes (threads spread over them)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument(
        "--parameters",
        type=int,
        default=167_936,
        help="float32 weights of the model (default %(default)s: 0.67 MB, the reference CNN's size)",
    )
    p.add_argument(
        "--shared-channel",
        action="store_true",
        help="the clients of one worker share one gRPC channel (one polling thread): for 5,000+ clients",
    )
    p.add_argument("--compression", default="none", choices=("none", "fp16", "int8"))
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "scale.json")
    args = p.parse_args()

    from fedgrpc.client.light import light_examples, light_update
    from fedgrpc.common.processes import free_port
    from fedgrpc.server.checkpoint import CheckpointStore

    with tempfile.TemporaryDirectory(prefix="fedgrpc-scale-") as tmp:
        work = Path(tmp)
        port, out = free_port(), work / "out"
        command = [
            str(BIN / "fl-server"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
            "--rounds", str(args.rounds), "--clients", str(args.clients), "--task", str(SIZED),
            "--param", f"parameters={args.parameters}", "--eval-every", "0",
            "--out", str(out), "--threads", "1", "--join-timeout", "600", "--compression", args.compression,
        ]  # fmt: skip
        if args.per_round:
            command += ["--clients-per-round", str(args.per_round)]
        server_log = work / "server.log"
        server = subprocess.Popen(command, stdout=server_log.open("wb"), stderr=subprocess.STDOUT)
        stop, peak = threading.Event(), [0, 0, 0]
        watcher = threading.Thread(target=_peak_rss, args=(server.pid, stop, peak), daemon=True)
        watcher.start()

        started = time.monotonic()
        context = mp.get_context("spawn")
        results: mp.Queue = context.Queue()  # type: ignore[type-arg]
        ids = list(range(1, args.clients + 1))
        workers = [
            context.Process(
                target=_clients,
                args=(f"127.0.0.1:{port}", ids[k :: args.workers], args.rounds, args.shared_channel, results),
            )
            for k in range(args.workers)
        ]
        for worker in workers:
            worker.start()
        answers = [results.get(timeout=3600) for _ in workers]
        reports = [r for done, _ in answers for r in done]
        last_weights = next((w for _, w in answers if w is not None), None)
        for worker in workers:
            worker.join()
        code = server.wait(timeout=300)
        wall = time.monotonic() - started
        stop.set()
        log = server_log.read_text()
        if code != 0:
            print(log[-4000:], file=sys.stderr)
            raise SystemExit(f"fl-server exited {code}")
        rounds = json.loads((out / "history.json").read_text())["rounds"]
        history = rounds[-1]
        saved = CheckpointStore(out / "checkpoint").load()
        assert saved is not None

    # The last round's aggregate, recomputed from what every light client sent.
    if last_weights is None:
        raise SystemExit("no client that kept its weights was sampled in the last round; run again")
    start_weights = [np.asarray(w, np.float32) for w in last_weights]
    trained = sorted(c["client_id"] for c in history["clients"])
    total = sum(light_examples(c) for c in trained)
    expected = [np.zeros(w.shape) for w in start_weights]
    for c in trained:
        for acc, w in zip(expected, light_update(start_weights, c, args.rounds), strict=True):
            acc += w.astype(np.float64) * light_examples(c)
    error = max(float(np.max(np.abs(e / total - s))) for e, s in zip(expected, saved.weights, strict=True))

    latencies = sorted(s for r in reports for s in r["submit_s"])
    model_bytes = sum(w.nbytes for w in start_weights)
    row = {
        "clients": args.clients,
        "trained": len(trained),
        "compression": args.compression,
        "rounds": args.rounds,
        "round_s": [r["seconds"] for r in rounds],
        "wall_s_incl_start": wall,
        "submit_p50_ms": 1e3 * statistics.median(latencies),
        "submit_p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "submit_max_ms": 1e3 * latencies[-1],
        "server_peak_rss_MB": peak[0] / 1e6,
        "server_peak_threads": peak[1],
        "server_peak_fds": peak[2],
        "model_MB": model_bytes / 1e6,
        "bytes_up_MB": history["bytes_in"] / 1e6,
        "bytes_down_MB": history["bytes_out"] / 1e6,
        "max_abs_error_vs_recomputed_mean": error,
    }
    print(f"{args.clients} light clients, {len(trained)} trained, model {model_bytes / 1e6:.2f} MB, loopback")
    for key, value in row.items():
        print(f"  {key:<34} {value:>12.4g}" if isinstance(value, float) else f"  {key:<34} {value!s:>12}")
    ok = error <= 1e-6 and len(trained) == (args.per_round or args.clients)
    print("aggregate:", "correct (<= 1e-6 from the recomputed mean)" if ok else "WRONG")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"config": vars(args) | {"json": str(args.json)}, "result": row}, indent=2)
    )
    print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
