"""Aggregation: fold speed against a bare np.add, and server memory under 50 concurrent updates.

    python bench/aggregate.py [--mb 100] [--clients 50] [--runs memory:256 memory:1 disk:256]

1. Throughput over a --mb float32 model, best of --repeat, against an in-place float32
   `np.add(acc, update, out=acc)` measured in the same run (the floor):
   - the fold: `WeightedSum.add_change`, what the coordinator's one fold thread does for each
     accepted update (every update passes through it one at a time);
   - the preparation: `weighted_change` in place, what each stream's own handler thread does
     to a tensor as it arrives (in parallel across streams, overlapped with the network);
   - `WeightedSum.add` of weights as sent (both steps at once, in blocks: the path used
     while updates are recorded).
2. Memory: a coordinator server (the real servicer, round state machine and FedAvg, no
   TensorFlow) in a child process holds a --mb model; --clients clients submit an update
   each at the same time over loopback. Each run is STAGING:INFLIGHT_MB: updates staged in
   memory or on disk (--spool-dir), and --max-inflight-mb. Reports the server's RSS before
   the submits and at its peak (VmHWM), as multiples of the model size, and checks the
   aggregate against the exact weighted mean (client k sends global + k with k examples).
Prints a table and writes JSON (bench/results/aggregate.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np

TENSOR_BYTES = 4 << 20


def model(total_mb: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    count = max(1, (total_mb << 20) // TENSOR_BYTES)
    return [rng.standard_normal(TENSOR_BYTES // 4, dtype=np.float32) for _ in range(count)]


def best_of(repeat: int, run: Any) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def throughput(total_mb: int, repeat: int) -> dict[str, float]:
    from fedgrpc.server.aggregate import WeightedSum, weighted_change

    update = model(total_mb)
    reference = [w * np.float32(0.5) for w in update]
    nbytes = sum(w.nbytes for w in update)
    acc = [np.full(w.shape, 0.0, np.float32) for w in update]
    changes = [weighted_change(w, g, 37) for w, g in zip(update, reference, strict=True)]
    work = [w.copy() for w in update]
    total = WeightedSum(reference)

    def floor() -> None:
        for a, w in zip(acc, update, strict=True):
            np.add(a, w, out=a)

    def prepare() -> float:
        for w, original in zip(work, update, strict=True):
            np.copyto(w, original)  # not timed: the intake prepares the buffer it received into
        started = time.perf_counter()
        for w, g in zip(work, reference, strict=True):
            weighted_change(w, g, 37, in_place=True)
        return time.perf_counter() - started

    times = {
        "np.add float32 (floor)": best_of(repeat, floor),
        "fold: WeightedSum.add_change": best_of(repeat, lambda: total.add_change(changes, 37)),
        "prepare: weighted_change": min(prepare() for _ in range(repeat)),
        "WeightedSum.add (both, blocked)": best_of(repeat, lambda: total.add(update, 37)),
    }
    return {name: nbytes / 1e9 / seconds for name, seconds in times.items()}


def _rss() -> tuple[int, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def _serve(total_mb: int, clients: int, inflight_mb: int, staging: str, pipe: Any) -> None:
    from fedgrpc.server.memory import limit_malloc_arenas

    limit_malloc_arenas()  # as fl-server does, before any thread starts
    from fedgrpc.common.codec import spec_of
    from fedgrpc.common.config import RunSpec
    from fedgrpc.server.endpoint import EndpointConfig, GrpcEndpoint
    from fedgrpc.server.rounds import RoundCoordinator
    from fedgrpc.server.strategy import FedAvg

    weights = model(total_mb)
    specs = [spec_of(f"t{i}", w) for i, w in enumerate(weights)]
    coordinator = RoundCoordinator(
        RunSpec(rounds=1, num_clients=clients), specs, FedAvg(), max_examples=10**6
    )
    for client in range(1, clients + 1):
        coordinator.next_task(client, after_round=0, timeout=0)
    coordinator.open_round(1, weights)
    spool = tempfile.TemporaryDirectory(prefix="fedgrpc-bench-spool-") if staging == "disk" else None
    endpoint = GrpcEndpoint(
        coordinator,
        EndpointConfig(
            host="127.0.0.1",
            port=0,
            max_inflight_bytes=inflight_mb << 20,
            spool_dir=Path(spool.name) if spool else None,
        ),
    )
    port = endpoint.start()
    before, _ = _rss()
    pipe.send(port)
    coordinator.wait_for_updates(clients)
    _, peak_receiving = _rss()
    result = coordinator.close_round().weights
    _, peak = _rss()
    # The exact mean of what was sent (client k: the float32 values of global + k, k examples).
    error = 0.0
    for i, w in enumerate(weights):
        want = sum(k * (w + np.float32(k)).astype(np.float64) for k in range(1, clients + 1))
        error = max(error, float(np.max(np.abs(result[i] - want / sum(range(1, clients + 1))))))
    # A float32 sum of K changes is within K float32 steps of their magnitude (here the mean
    # change, sum k^2 / sum k), plus the rounding of the result itself.
    mean_change = sum(k * k for k in range(1, clients + 1)) / sum(range(1, clients + 1))
    largest = max(float(np.abs(r).max()) for r in result)
    bound = clients * 2.0**-24 * mean_change + float(np.spacing(np.float32(largest)))
    pipe.send(
        {
            "error_bound": bound,
            "rss_before": before,
            "rss_peak_receiving": peak_receiving,
            "rss_peak": peak,
            "max_abs_error": error,
            "inflight_peak_bytes": endpoint.inflight.peak_bytes,
        }
    )
    endpoint.stop(grace=0)
    if spool is not None:
        spool.cleanup()


def memory(total_mb: int, clients: int, inflight_mb: int, staging: str) -> dict[str, Any]:
    from fedgrpc.client.connection import Connection
    from fedgrpc.common.codec import spec_of

    ours, theirs = mp.get_context("spawn").Pipe()
    child = mp.get_context("spawn").Process(
        target=_serve, args=(total_mb, clients, inflight_mb, staging, theirs)
    )
    child.start()
    port = ours.recv()
    weights = model(total_mb)
    specs = [spec_of(f"t{i}", w) for i, w in enumerate(weights)]
    shifted = (
        {k: [w + np.float32(k) for w in weights] for k in range(1, clients + 1)} if clients <= 8 else None
    )

    def submit(k: int) -> float:
        # Above 8 clients the updates are made one at a time so this side's memory stays small.
        update = shifted[k] if shifted else [w + np.float32(k) for w in weights]
        started = time.perf_counter()
        with Connection(f"127.0.0.1:{port}", k, connect_timeout_s=600) as connection:
            connection.submit(1, specs, update, k, {})
        return time.perf_counter() - started

    started = time.perf_counter()
    with futures.ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = list(pool.map(submit, range(1, clients + 1)))
    elapsed = time.perf_counter() - started
    report: dict[str, Any] = ours.recv()
    child.join(timeout=60)
    model_bytes = sum(w.nbytes for w in weights)
    return report | {
        "model_bytes": model_bytes,
        "clients": clients,
        "inflight_mb": inflight_mb,
        "staging": staging,
        "seconds": elapsed,
        "max_submit_s": max(latencies),
        "rss_before_x_model": report["rss_before"] / model_bytes,
        "rss_peak_x_model": report["rss_peak"] / model_bytes,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=100)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument(
        "--runs",
        nargs="+",
        default=["memory:256", "memory:1", "disk:256"],
        help="STAGING:INFLIGHT_MB for each memory run; STAGING is memory or disk",
    )
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "aggregate.json")
    args = p.parse_args()

    speeds = throughput(args.mb, args.repeat)
    floor = speeds["np.add float32 (floor)"]
    print(f"fold of a {args.mb} MB float32 update, best of {args.repeat}")
    print(f"{'':<32} | {'GB/s':>6} {'x floor':>7}")
    for name, speed in speeds.items():
        print(f"{name:<32} | {speed:>6.2f} {speed / floor:>7.2f}")

    runs = []
    for run in args.runs:
        staging, _, inflight = run.partition(":")
        if staging not in ("memory", "disk") or not inflight.isdigit():
            p.error(f"--runs takes STAGING:INFLIGHT_MB, e.g. disk:256; got {run!r}")
        runs.append(memory(args.mb, args.clients, int(inflight), staging))
    print()
    print(f"server memory, {args.clients} clients submitting a {args.mb} MB update at once")
    print(
        f"{'staging':>7} {'inflight MB':>11} | {'RSS before':>10} {'peak':>8} | {'x model':>7} | "
        f"{'seconds':>7} | error (bound)"
    )
    for r in runs:
        print(
            f"{r['staging']:>7} {r['inflight_mb']:>11} | {r['rss_before'] / 1e6:>7.0f} MB "
            f"{r['rss_peak'] / 1e6:>5.0f} MB | {r['rss_peak_x_model']:>7.2f} | {r['seconds']:>7.1f} | "
            f"{r['max_abs_error']:.1e} ({r['error_bound']:.1e})"
            f"  (peak while receiving {r['rss_peak_receiving'] / 1e6:.0f} MB)"
        )
    ok = all(r["max_abs_error"] <= r["error_bound"] for r in runs)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"config": vars(args) | {"json": str(args.json)}, "fold_GBps": speeds, "memory": runs}, indent=2
        )
    )
    print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
