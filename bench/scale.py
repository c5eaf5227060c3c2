"""Many light clients (no TensorFlow) against one real fl-server on loopback.

    python bench/scale.py [--clients 1000] [--per-round K] [--rounds 1] [--workers 4]
        [--shared-channel] [--parameters N] [--compression none]
    python bench/scale.py --enrolled 1000000 [--clients 5000] [--per-round 1000] [--rounds 3]
        [--checkin-rate 1000]

With --enrolled N ("enrolled" mode, fedgrpc.server.pacing and auth's TokenTable): N identities
are enrolled with hashed tokens (a tokens file of N digests), --clients of them are online,
light clients with their own tokens, asyncio, thousands a process, and check in at the rate
the server paces them to (--checkin-rate); --per-round of them train each round. Reports the
memory one enrolled identity costs the server's token table (measured here, tracemalloc, over
loading the same file), the server's RSS, round times, check-ins a second, open calls (and
long-polls) and descriptors at their highest; JSON to bench/results/scale-enrolled.json.

Starts `fl-server` (bench/tasks/sized.py: one dense layer of --parameters float32 weights,
the reference CNN's 0.67 MB by default, no data, no evaluation) for --rounds rounds of
--clients clients (K of them sampled a round with --per-round), and the light clients spread
over --workers processes. Each process runs its clients as coroutines on one asyncio event
loop (grpc.aio, fedgrpc.client.light.run_light_clients), so the clients cost little and the
figures are the server's: a channel per client (gRPC lets the channels of one process to one
server share its TCP connection), or with --shared-channel one channel per process.

Measures the round times the server logs, each client's SubmitUpdate latency (p50, p99, max),
the server's peak RSS (VmHWM), its threads, open file descriptors and open gRPC calls at their
highest, the update streams it cut for stalling, the calls their clients ended early, the
tracebacks in its log, the machine's peak load average, and checks the aggregate of the last
round: the server's weights against the example-weighted mean of what every light client
sent, recomputed here from (client id, round). Prints a table and writes JSON
(bench/results/scale.json, the server's log beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent
SIZED = Path(__file__).resolve().parent / "tasks" / "sized.py"  # a one-layer model of any size, no data
RESULTS = Path(__file__).resolve().parent / "results"
KEEPERS = 50  # clients per process that keep the weights they were sent, to check the last round


def _clients(target: str, ids: list[int], last_round: int, shared: bool, results: mp.Queue) -> None:  # type: ignore[type-arg]
    from fedgrpc.client.light import LightSettings, run_light_clients

    keepers = set(ids[:KEEPERS])
    settings = LightSettings(connect_timeout_s=600)
    done, failed = asyncio.run(
        run_light_clients(
            target, ids, settings, shared_channel=shared, keep_weights=lambda client_id: client_id in keepers
        )
    )
    last = next((s.received[last_round] for s in done.values() if last_round in s.received), None)
    reports = [{"submit_s": s.submit_seconds, "retried": s.retried} for s in done.values()]
    results.put((reports, failed, None if last is None else [w.tolist() for w in last]))


def _enrolled_clients(target: str, ids: list[int], results: mp.Queue) -> None:  # type: ignore[type-arg]
    from fedgrpc.client.light import LightSettings, run_light_clients

    settings = LightSettings(connect_timeout_s=600)
    done, failed = asyncio.run(run_light_clients(target, ids, settings, token_of=_token))
    results.put(([{"polls": s.polls, "rounds": s.rounds} for s in done.values()], failed))


def _token(client_id: int) -> str:
    return f"bench-token-{client_id}"


def _watch(pid: int, metrics_url: str, stop: threading.Event, peak: dict[str, float]) -> None:
    """Highest VmHWM, threads, descriptors and open calls of the server, its stall and early-end
    counters as last scraped, and the machine's highest 1-minute load average."""

    def high(key: str, value: float) -> None:
        peak[key] = max(peak.get(key, 0.0), value)

    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    high("rss_bytes", int(line.split()[1]) * 1024)
                if line.startswith("VmRSS:"):
                    peak["rss_now_bytes"] = int(line.split()[1]) * 1024
                if line.startswith("Threads:"):
                    high("threads", int(line.split()[1]))
            high("fds", len(os.listdir(f"/proc/{pid}/fd")))
            high("load", float(Path("/proc/loadavg").read_text().split()[0]))
        except OSError:
            return
        try:
            with urllib.request.urlopen(metrics_url, timeout=5) as answer:
                text = answer.read().decode()
        except OSError:
            text = ""
        for name, key in (
            ("fedgrpc_open_calls", "open_calls"),
            ('fedgrpc_open_calls_by_kind{kind="long_poll"}', "open_long_polls"),
            ('fedgrpc_refusals_total{code="DEADLINE_EXCEEDED"}', "stalls_cut"),
            ("fedgrpc_calls_ended_early_total", "ended_early"),
        ):
            found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
            if found:
                high(key, float(found.group(1)))
        time.sleep(0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--per-round", type=int, default=None, help="--clients-per-round (default: all)")
    p.add_argument("--workers", type=int, default=4, help="client processes, one event loop each")
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
        help="the clients of one worker share one gRPC channel (else one channel each)",
    )
    p.add_argument("--compression", default="none", choices=("none", "fp16", "int8"))
    p.add_argument("--timeout", type=float, default=3600, help="seconds the clients may take (default 3600)")
    p.add_argument("--json", type=Path, default=None, help="default bench/results/scale[-enrolled].json")
    p.add_argument("--enrolled", type=int, default=None, help="enrolled mode: N identities with tokens")
    p.add_argument(
        "--checkin-rate", type=float, default=1000, help="fl-server --checkin-rate (enrolled mode)"
    )
    args = p.parse_args()
    if args.json is None:
        args.json = RESULTS / ("scale-enrolled.json" if args.enrolled else "scale.json")
    if args.enrolled:
        return enrolled(args)

    from fedgrpc.client.light import light_examples, light_update
    from fedgrpc.common.processes import free_port
    from fedgrpc.server.checkpoint import CheckpointStore

    with tempfile.TemporaryDirectory(prefix="fedgrpc-scale-") as tmp:
        work = Path(tmp)
        port, http_port, out = free_port(), free_port(), work / "out"
        command = [
            str(BIN / "fl-server"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
            "--rounds", str(args.rounds), "--clients", str(args.clients), "--task", str(SIZED),
            "--param", f"parameters={args.parameters}", "--eval-every", "0",
            "--out", str(out), "--threads", "1", "--join-timeout", "600", "--compression", args.compression,
            "--http", str(http_port),
        ]  # fmt: skip
        if args.per_round:
            command += ["--clients-per-round", str(args.per_round)]
        server_log = work / "server.log"
        server = subprocess.Popen(command, stdout=server_log.open("wb"), stderr=subprocess.STDOUT)
        stop, peak = threading.Event(), dict[str, float]()
        metrics_url = f"http://127.0.0.1:{http_port}/metrics"
        watcher = threading.Thread(target=_watch, args=(server.pid, metrics_url, stop, peak), daemon=True)
        watcher.start()

        deadline = time.monotonic() + 300
        while "listening on port" not in server_log.read_text(errors="replace"):  # then clients retry nothing
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                tail = server_log.read_text(errors="replace")[-3000:]
                raise SystemExit(f"fl-server did not start:\n{tail}")
            time.sleep(0.2)
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
        kept_log = args.json.with_name(args.json.stem + "-server.log")
        kept_log.parent.mkdir(parents=True, exist_ok=True)
        try:
            answers = [results.get(timeout=args.timeout) for _ in workers]
        except BaseException as exc:  # out of time, or interrupted: stop everything, keep the log
            for worker in workers:
                worker.kill()
            server.kill()
            if isinstance(exc, queue.Empty):
                sys.exit(
                    f"the clients did not finish within --timeout {args.timeout:.0f} s; "
                    f"the server's log: {kept_log}"
                )
            raise
        finally:
            shutil.copyfile(server_log, kept_log)  # kept for a look, however the run ends
        reports = [r for done, _, _ in answers for r in done]
        failures = {i: e for _, failed, _ in answers for i, e in failed.items()}
        last_weights = next((w for _, _, w in answers if w is not None), None)
        for worker in workers:
            worker.join()
        code = server.wait(timeout=300)
        wall = time.monotonic() - started
        stop.set()
        watcher.join()
        shutil.copyfile(server_log, kept_log)
        log = server_log.read_text(errors="replace")
        if code != 0:
            print(log[-4000:], file=sys.stderr)
            raise SystemExit(f"fl-server exited {code}")
        if failures:
            first = sorted(failures.items())[:5]
            raise SystemExit(f"{len(failures)} light clients failed, e.g. {first}")
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
    retried: dict[str, int] = {}
    for report in reports:
        for code, count in report["retried"].items():
            retried[code] = retried.get(code, 0) + count
    model_bytes = sum(w.nbytes for w in start_weights)
    ended_in_log = [int(n) for n in re.findall(r"calls ended by their client .*, (\d+) in all", log)]
    row = {
        "clients": args.clients,
        "trained": len(trained),
        "compression": args.compression,
        "rounds": args.rounds,
        "round_s": [r["seconds"] for r in rounds],
        "wall_s_from_listening": wall,
        "submit_p50_ms": 1e3 * statistics.median(latencies),
        "submit_p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "submit_max_ms": 1e3 * latencies[-1],
        "server_peak_rss_MB": peak.get("rss_bytes", 0.0) / 1e6,
        "server_peak_threads": int(peak.get("threads", 0)),
        "server_peak_fds": int(peak.get("fds", 0)),
        "server_peak_open_calls": int(peak.get("open_calls", 0)),
        "streams_cut_for_stalling": int(peak.get("stalls_cut", 0)),
        "calls_ended_early": max([int(peak.get("ended_early", 0)), *ended_in_log]),
        "server_log_tracebacks": log.count("Traceback"),
        "client_calls_retried": retried,
        "server_log_join_lines": log.count(" joined from "),
        "peak_load_average": peak.get("load", 0.0),
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
    print(f"wrote {args.json} (the server's log: {kept_log})")
    return 0 if ok else 1


def enrolled(args: argparse.Namespace) -> int:
    """The enrolled mode (see the module docstring)."""
    from fedgrpc.common.processes import free_port

    per_round = args.per_round or 1000
    with tempfile.TemporaryDirectory(prefix="fedgrpc-enrolled-") as tmp:
        work = Path(tmp)
        tokens, bytes_per_identity = _tokens_file(work / "tokens.json", args.enrolled)
        port, http_port, out = free_port(), free_port(), work / "out"
        grace = 10 + 2 * args.clients / args.checkin_rate  # the clients sent away come back to hear FINISHED
        command = [
            str(BIN / "fl-server"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
            "--rounds", str(args.rounds), "--clients", str(args.enrolled), "--task", str(SIZED),
            "--param", f"parameters={args.parameters}", "--eval-every", "0", "--out", str(out),
            "--threads", "1", "--clients-per-round", str(per_round), "--tokens", str(tokens),
            "--min-clients", str(args.clients), "--join-timeout", "1", "--finish-grace", str(grace),
            "--checkin-rate", str(args.checkin_rate), "--http", str(http_port),
        ]  # fmt: skip
        server_log = work / "server.log"
        server = subprocess.Popen(command, stdout=server_log.open("wb"), stderr=subprocess.STDOUT)
        stop, peak = threading.Event(), dict[str, float]()
        watcher = threading.Thread(
            target=_watch, args=(server.pid, f"http://127.0.0.1:{http_port}/metrics", stop, peak), daemon=True
        )
        watcher.start()
        _wait_listening(server, server_log)
        started = time.monotonic()
        context = mp.get_context("spawn")
        results: mp.Queue = context.Queue()  # type: ignore[type-arg]
        step = args.enrolled // args.clients  # the online identities, spread over the enrolled ones
        ids = [1 + k * step for k in range(args.clients)]
        workers = [
            context.Process(
                target=_enrolled_clients, args=(f"127.0.0.1:{port}", ids[k :: args.workers], results)
            )
            for k in range(args.workers)
        ]
        for worker in workers:
            worker.start()
        kept_log = args.json.with_name(args.json.stem + "-server.log")
        kept_log.parent.mkdir(parents=True, exist_ok=True)
        try:
            answers = [results.get(timeout=args.timeout) for _ in workers]
        finally:
            shutil.copyfile(server_log, kept_log)
            for worker in workers:
                worker.kill()
        wall = time.monotonic() - started
        code = server.wait(timeout=300)
        stop.set()
        watcher.join()
        shutil.copyfile(server_log, kept_log)
        if code != 0:
            raise SystemExit(f"fl-server exited {code}; its log: {kept_log}")
        rounds = json.loads((out / "history.json").read_text())["rounds"]
    reports = [r for done, _ in answers for r in done]
    failures = {i: e for _, failed in answers for i, e in failed.items()}
    polls = sum(r["polls"] for r in reports)
    row = {
        "enrolled": args.enrolled,
        "online": args.clients,
        "per_round": per_round,
        "rounds": len(rounds),
        "round_s": [r["seconds"] for r in rounds],
        "trained_per_round": [len(r["clients"]) for r in rounds],
        "token_table_bytes_per_identity": bytes_per_identity,
        "server_peak_rss_MB": peak.get("rss_bytes", 0.0) / 1e6,
        "server_rss_at_end_MB": peak.get("rss_now_bytes", 0.0) / 1e6,
        "checkin_rate_asked": args.checkin_rate,
        "checkins": polls,
        "checkins_per_s": polls / wall,
        "server_peak_open_calls": int(peak.get("open_calls", 0)),
        "server_peak_long_polls": int(peak.get("open_long_polls", 0)),
        "server_peak_fds": int(peak.get("fds", 0)),
        "server_peak_threads": int(peak.get("threads", 0)),
        "calls_ended_early": int(peak.get("ended_early", 0)),
        "clients_failed": len(failures),
        "wall_s_from_listening": wall,
        "peak_load_average": peak.get("load", 0.0),
    }
    print(f"{args.enrolled} enrolled identities, {args.clients} online, {per_round} a round, loopback")
    for key, value in row.items():
        print(f"  {key:<34} {value:>12.4g}" if isinstance(value, float) else f"  {key:<34} {value!s:>12}")
    ok = not failures and row["trained_per_round"] == [per_round] * args.rounds
    print(
        "rounds:",
        "every round trained its sample" if ok else f"WRONG (failures e.g. {list(failures.items())[:3]})",
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"config": vars(args) | {"json": str(args.json)}, "result": row}, indent=2)
    )
    print(f"wrote {args.json} (the server's log: {kept_log})")
    return 0 if ok else 1


def _tokens_file(path: Path, count: int) -> tuple[Path, float]:
    """A tokens file of `count` hashed tokens, and the bytes one identity costs in the server's
    table (fedgrpc.server.auth.TokenTable), measured by loading it here under tracemalloc."""
    import gc
    import hashlib
    import tracemalloc

    from fedgrpc.server.auth import TokenTable

    digests = {str(c): hashlib.sha256(_token(c).encode()).hexdigest() for c in range(1, count + 1)}
    path.write_text(json.dumps({"clients": digests}))
    del digests
    gc.collect()
    tracemalloc.start()
    table = TokenTable(path)
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(table) == count
    return path, held / count


def _wait_listening(server: subprocess.Popen[bytes], server_log: Path) -> None:
    deadline = time.monotonic() + 300
    while "listening on port" not in server_log.read_text(errors="replace"):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"fl-server did not start:\n{server_log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
