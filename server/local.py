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
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ..common import run_file, settings
from ..common.device import gpus_present
from ..common.errors import ConfigError, FedGrpcError
from ..common.processes import free_port, spawn
from ..common.settings import CLIENTS, DATA, ROUNDS, TASK, Setting, site_data

#: fl-local's own settings; --clients, --rounds, --task, --data and --out are fl-server's too.
SETTINGS = (
    Setting(
        "config",
        Path,
        None,
        metavar="RUN.toml",
        in_file=False,
        help="a run file for the server (see fl-server --help); fl-local takes --clients, --task and "
        "--data from it too, and a flag typed here overrides it",
    ),
    CLIENTS,
    ROUNDS,
    TASK,
    DATA,
    Setting("out", Path, Path("results"), help="folder for history, curves and model (default %(default)s)"),
    Setting("threads", int, None, low=0, help="CPU threads per client (0 or unset: all cores)"),
    Setting(
        "gpus",
        str,
        "",
        metavar="0,1,...",
        help="GPUs for the clients, round robin: client 1 on the first listed, client 2 on the second, ...",
    ),
    Setting(
        "schedule",
        str,
        "auto",
        choices=("auto", "turns", "parallel"),
        help="clients train one at a time (turns) or at once (parallel); auto: at once on a GPU "
        "machine or when clients <= cores, else turns",
    ),
)


def run_federation(
    *,
    clients: int,
    rounds: int | None,
    data: str | None,
    out_dir: Path,
    task: str | None = None,
    threads: int | None = None,
    schedule: str = "auto",
    gpus: Sequence[str] = (),
    server_args: Sequence[str] = (),
    logs_dir: Path | None = None,
    timeout_s: float | None = None,
    config: Path | None = None,
) -> int:
    """Run server and clients to the end; returns 0 when every process exited 0. The server
    reads `config` (a run file) itself; `rounds` None leaves the rounds to it."""
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
        *(["--config", str(config)] if config else []), *(["--rounds", str(rounds)] if rounds else []),
        "--clients", str(clients), "--out", str(out_dir), *server_args,
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
        cmd = _client_command(client_id, port, threads, turn_lock, gpus, shared)
        if per_client:
            cmd += ["--data", str(site_data(data, client_id))]
        procs.append(spawn(cmd, logs_dir / f"client-{client_id}.log" if logs_dir else None))

    return _supervise(procs, ["fl-server"] + [f"fl-client {i}" for i in range(1, clients + 1)], timeout_s)


def _supervise(
    procs: list[tuple[subprocess.Popen[str], threading.Thread]], names: list[str], timeout_s: float | None
) -> int:
    """Wait for every process to end (stopping the rest once one fails or time runs out); 0 when
    every one exited 0, else 1 with a line naming those that did not."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while None in [p.poll() for p, _ in procs]:  # poll every one: a client may have failed
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
    bad = [f"{n} exited {p.returncode}" for n, (p, _) in zip(names, procs, strict=True) if p.returncode != 0]
    if bad:
        print("fl-local: " + ", ".join(bad), file=sys.stderr)
        return 1
    return 0


def _client_command(
    client_id: int, port: int, threads: int, turn_lock: Path | None, gpus: Sequence[str], shared: list[str]
) -> list[str]:
    cmd = [sys.executable, "-m", "fedgrpc.client.cli", "--insecure", "--id", str(client_id)]
    cmd += ["--server", f"127.0.0.1:{port}", "--threads", str(threads)]
    if turn_lock:
        cmd += ["--take-turns", str(turn_lock)]
    if gpus:
        cmd += ["--gpu", gpus[(client_id - 1) % len(gpus)]]
    return cmd + shared


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except FedGrpcError as exc:
        print(f"fl-local: error: {exc}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    p = settings.build_parser(SETTINGS, prog="fl-local", description=__doc__ or "", raw_description=True)
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: more fl-server options")
    args = p.parse_args(argv)
    extra = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
    passed_on = _config_in(extra)
    if args.config is not None and passed_on is not None:
        raise ConfigError(
            f"--config {args.config} and --config {passed_on} after --: give the run file once "
            "(before --, and fl-local passes it on to fl-server)"
        )
    config = args.config or passed_on
    # What the user typed wins; else the run file's value; else fl-local's default. A run file
    # is passed to the server, and the defaults nobody chose are not (they would override it).
    chosen = run_file.merge_run_file(p, argv, args, SETTINGS, config)
    return run_federation(
        clients=args.clients,
        rounds=args.rounds if config is None or "rounds" in chosen else None,
        data=args.data,
        out_dir=args.out,
        task=args.task if "task" in chosen else None,
        threads=args.threads,
        schedule=args.schedule,
        gpus=[g for g in args.gpus.split(",") if g.strip()],
        server_args=extra,
        config=args.config,
    )


def _config_in(server_args: Sequence[str]) -> Path | None:
    """A --config passed on to the server after --: fl-local reads it too (the last one, as
    the server does)."""
    found = None
    for i, arg in enumerate(server_args):
        if arg == "--config" and i + 1 < len(server_args):
            found = Path(server_args[i + 1])
        elif arg.startswith("--config="):
            found = Path(arg.split("=", 1)[1])
    return found


if __name__ == "__main__":
    sys.exit(main())
