"""`fl-local`: a whole federation on this machine, one fl-server and N fl-client processes.

Real processes talking gRPC over loopback, as on separate machines; this only saves typing
the N+1 commands. Clients that share one machine's CPU share its cores, so by default each
client gets all cores as intra-op threads, and when there are more clients than cores they
take turns training (a lock file), which on 2 cores finished a round of 3 clients sooner
than time-slicing them: see `fl-client --take-turns`. On a machine with NVIDIA GPUs the
clients train at once, sharing the cards (`--gpus 0,1`: client k on card (k-1) mod 2; memory is
taken as needed, see fedgrpc.common.device); KERAS_BACKEND picks the backend of every process.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fedgrpc.common.device import gpus_present
from fedgrpc.common.processes import free_port, spawn


def run_federation(
    *,
    clients: int,
    rounds: int,
    data: str | None,
    out_dir: Path,
    task: str | None = None,
    threads: int | None = None,
    schedule: str = "auto",
    gpus: Sequence[str] = (),
    server_args: Sequence[str] = (),
    logs_dir: Path | None = None,
    timeout_s: float | None = None,
) -> int:
    """Run server and clients to the end; returns 0 when every process exited 0."""
    port = free_port()
    cores = os.cpu_count() or 1
    threads = threads or cores
    if schedule == "auto":
        on_gpu = bool(gpus) or gpus_present() > 0
        schedule = "parallel" if on_gpu or clients <= cores else "turns"
    turn_lock = out_dir / ".train.lock" if schedule == "turns" else None
    out_dir.mkdir(parents=True, exist_ok=True)
    # The same interpreter, by module: works wherever fedgrpc is importable (a venv, a --target
    # folder on PYTHONPATH), not only where the console scripts sit beside sys.executable.
    server_cmd = [
        sys.executable, "-m", "fedgrpc.server.cli", "--host", "127.0.0.1", "--port", str(port), "--insecure",
        "--rounds", str(rounds), "--clients", str(clients), "--out", str(out_dir), *server_args,
    ]  # fmt: skip
    shared = ["--task", task] if task else []
    per_client = data is not None and "{id}" in data  # each client its own file
    if data and not per_client:
        shared += ["--data", data]
    server_cmd += shared
    if logs_dir:
        logs_dir.mkdir(parents=True, exist_ok=True)
    procs = [spawn(server_cmd, logs_dir / "server.log" if logs_dir else None)]
    for client_id in range(1, clients + 1):
        cmd = [
            sys.executable,
            "-m",
            "fedgrpc.client.cli",
            "--insecure",
            "--id",
            str(client_id),
            "--server",
            f"127.0.0.1:{port}",
            "--threads",
            str(threads),
        ]
        if turn_lock:
            cmd += ["--take-turns", str(turn_lock)]
        if gpus:
            cmd += ["--gpu", gpus[(client_id - 1) % len(gpus)]]
        cmd += shared
        if per_client:
            cmd += ["--data", str(data).replace("{id}", str(client_id))]
        procs.append(spawn(cmd, logs_dir / f"client-{client_id}.log" if logs_dir else None))

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p, _ in procs):
            failed = [p for p, _ in procs if p.returncode not in (None, 0)]
            if failed or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(0.2)
    finally:
        for process, _ in procs:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, pump in procs:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            pump.join(timeout=5)
    codes = [p.returncode for p, _ in procs]
    names = ["fl-server"] + [f"fl-client {i}" for i in range(1, clients + 1)]
    bad = [f"{n} exited {c}" for n, c in zip(names, codes, strict=True) if c != 0]
    if bad:
        print("fl-local: " + ", ".join(bad), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="fl-local", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument(
        "--task",
        default=os.environ.get("FL_TASK") or None,
        help="the task for the server and every client (default: $FL_TASK, else cifar10)",
    )
    p.add_argument(
        "--data",
        default=os.environ.get("FL_DATA") or None,
        help="data for server and clients; {id} in it becomes each client's id, for sites with files "
        "of their own, e.g. data/hospital_{id}.csv (default $FL_DATA, else the task's default)",
    )
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads per client (default: all cores)")
    p.add_argument(
        "--gpus",
        default="",
        metavar="0,1,...",
        help="GPUs for the clients, round robin: client 1 on the first listed, client 2 on the second, ...",
    )
    p.add_argument(
        "--schedule",
        choices=["auto", "turns", "parallel"],
        default="auto",
        help="clients train one at a time (turns) or at once (parallel); auto: at once on a GPU "
        "machine or when clients <= cores, else turns",
    )
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: more fl-server options")
    args = p.parse_args(argv)
    extra = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
    return run_federation(
        clients=args.clients,
        rounds=args.rounds,
        data=args.data,
        out_dir=args.out,
        task=args.task,
        threads=args.threads,
        schedule=args.schedule,
        gpus=[g for g in args.gpus.split(",") if g.strip()],
        server_args=extra,
    )


if __name__ == "__main__":
    sys.exit(main())
