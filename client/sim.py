"""`fl-sim`: a federation of many clients on Ray, against a real fl-server.

    fl-sim --clients 100 --clients-per-round 10 --rounds 10 [--ray auto] [--cpus-per-client 1]
           [--gpus-per-client 0.25] [--task my_task.py --data data/] [-- more fl-server flags]

The server is a real `fl-server` process; the clients are N client ids served by a pool of
Ray actors (fedgrpc.client.sim_worker.SimWorker), each a real gRPC client of that server
through the same code as `fl-client`, keeping its framework and model warm across the ids it
serves. An actor asks Ray for `--cpus-per-client` CPUs and `--gpus-per-client` GPUs (a
fraction shares a card); there are as many actors as fit (at most one per client training at
once), and ids are dealt to them in turn. With `--clients-per-round K` the server samples K
ready clients a round; the others sleep until the server's retry-after (a thread each, no
call: docs/protocol.md, *Pacing*).

Without `--ray`, fl-sim starts a local Ray of this machine's cores and stops it at the end;
`--ray auto` (or an address) joins a running cluster (`ray start --head` on one machine,
`ray start --address ...` on the others): the server then listens on every interface and
actors reach it at this machine's address (`--advertise`). Every machine needs fedgrpc
installed and the data at the same path; shards are cut on the actors from the run spec, so
no data moves through Ray. What Ray carries is JSON text (settings in, reports out); Ray
itself ships the actor class to its workers with cloudpickle, inside your own cluster.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..common import logs, run_file, settings
from ..common.errors import ConfigError, FedGrpcError
from ..common.processes import free_port, spawn
from ..common.settings import CLIENTS, CLIENTS_PER_ROUND, DATA, ROUNDS, TASK, Setting

log = logging.getLogger("fedgrpc.sim")


def _actor_class(ray: Any) -> Any:
    @ray.remote
    class SimActor:
        """A Ray actor around one SimWorker; JSON in, JSON out."""

        def __init__(self, settings: str) -> None:
            from .app import ClientConfig
            from .sim_worker import SimWorker

            logs.setup("sim-actor", verbose=False)
            logging.getLogger().setLevel(logging.WARNING)  # N clients' round lines would drown the server's
            self.worker = SimWorker(ClientConfig(client_id=1, **json.loads(settings)))

        def devices(self) -> str:
            return str(self.worker.devices)

        def serve(self, client_ids: list[int]) -> str:
            return json.dumps(asdict(self.worker.serve(client_ids)))

    return SimActor


def actors_that_fit(resources: dict[str, float], cpus: float, gpus: float, wanted: int) -> int:
    """How many actors of (cpus, gpus) the cluster holds at once, at most `wanted`."""
    fit = [math.floor(resources.get("CPU", 0) / cpus + 1e-9)] if cpus > 0 else []
    if gpus > 0:
        fit.append(math.floor(resources.get("GPU", 0) / gpus + 1e-9))
    return max(0, min([wanted, *fit]))


#: fl-sim's settings; --clients, --clients-per-round, --rounds, --task, --data and --out are
#: fl-server's too, and a run file (--config) may set them.
SETTINGS = (
    Setting(
        "config", Path, None, metavar="RUN.toml", in_file=False,
        help="a run file for the server (see fl-server --help); fl-sim takes --clients, "
        "--clients-per-round, --task and --data from it too, and a flag typed here overrides it",
    ),
    replace(CLIENTS, default=100),
    CLIENTS_PER_ROUND,
    ROUNDS,
    TASK,
    DATA,
    Setting("out", Path, Path("results"), help="folder for history, curves and model (default %(default)s)"),
    Setting(
        "ray", str, None, metavar="ADDRESS", group="Ray",
        help="join a running Ray cluster ('auto', or host:port); default: start a local one",
    ),
    Setting("actors", int, None, low=1, group="Ray", help="Ray actors (default: as many as fit, at most K)"),
    Setting(
        "cpus_per_client", float, 1.0, above=0, group="Ray", help="CPUs each actor asks Ray for (default 1)"
    ),
    Setting(
        "gpus_per_client", float, 0.0, low=0, group="Ray",
        help="GPUs each actor asks for; 0.25: four share a card",
    ),
    Setting(
        "threads", int, None, low=0, group="Ray",
        help="backend threads per actor (0 or unset: its CPUs, rounded up)",
    ),
    Setting(
        "advertise", str, None, metavar="HOST", group="Ray",
        help="the address actors dial (default: 127.0.0.1, or this node's IP on a cluster)",
    ),
    Setting("logs", Path, None, group="Ray", help="write the server's log here instead of stderr"),
    Setting("timeout", float, None, above=0, group="Ray", help="give up after this many seconds"),
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags over a run file's values over the defaults: `args.server_flags` holds what the
    server must be told (a default nobody typed is not passed, so it cannot override the file)."""
    p = settings.build_parser(SETTINGS, prog="fl-sim", description=__doc__ or "", raw_description=True)
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: more fl-server options")
    args = p.parse_args(argv)
    args.server_args = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
    chosen = run_file.merge_run_file(p, argv, args, SETTINGS, args.config)
    args.server_flags = [
        *(["--config", str(args.config)] if args.config else []),
        *(["--rounds", str(args.rounds)] if "rounds" in chosen or args.config is None else []),
        "--clients", str(args.clients), "--out", str(args.out),
        *(["--join-timeout", "600"] if "join_timeout" not in chosen.in_file else []),
        *(["--clients-per-round", str(args.clients_per_round)] if args.clients_per_round else []),
        *(["--task", args.task] if "task" in chosen else []),
        *(["--data", args.data] if args.data and "{id}" not in args.data else []),
    ]  # fmt: skip
    return args


def simulate(args: argparse.Namespace) -> int:
    try:
        ray: Any = importlib.import_module("ray")
    except ImportError:
        raise ConfigError("fl-sim needs Ray: pip install 'fedgrpc[ray]'") from None
    on_cluster = args.ray is not None
    port = free_port()
    host = "0.0.0.0" if on_cluster else "127.0.0.1"
    if on_cluster:
        ray.init(address=args.ray, log_to_driver=True)
        log.warning(
            "the server listens on every interface without TLS; run the simulation on a trusted network"
        )
    else:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=True)
    target = f"{args.advertise or (ray.util.get_node_ip_address() if on_cluster else '127.0.0.1')}:{port}"
    per_round = args.clients_per_round or args.clients
    count = args.actors or actors_that_fit(
        ray.cluster_resources(), args.cpus_per_client, args.gpus_per_client, per_round
    )
    if count < 1:
        raise ConfigError(
            f"the Ray cluster has {ray.cluster_resources()}: not one actor of {args.cpus_per_client} CPUs "
            f"and {args.gpus_per_client} GPUs fits"
        )
    server_cmd = [
        sys.executable, "-m", "fedgrpc.server.cli", "--host", host, "--port", str(port), "--insecure",
        *args.server_flags, *args.server_args,
    ]  # fmt: skip
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    server, pump = spawn(server_cmd, args.logs / "server.log" if args.logs else None)
    worker_settings = json.dumps(
        {"server": target, "task": args.task, "data": args.data, "connect_timeout_s": 300.0,
         "threads": args.threads or max(1, math.ceil(args.cpus_per_client))}
    )  # fmt: skip
    actor_class = _actor_class(ray).options(
        num_cpus=args.cpus_per_client,
        num_gpus=args.gpus_per_client,
        runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}},
    )
    actors = [actor_class.remote(worker_settings) for _ in range(count)]
    ids = list(range(1, args.clients + 1))
    pending = {actor.serve.remote(ids[k::count]): k for k, actor in enumerate(actors)}
    log.info(
        "%d client ids on %d Ray actors (%g CPUs, %g GPUs each), %d a round; server at %s",
        args.clients, count, args.cpus_per_client, args.gpus_per_client, per_round, target,
    )  # fmt: skip
    stopped = False
    try:
        reports, broken = collect_reports(ray, pending, server, timeout_s=args.timeout)
        if not pending:
            # Every client has left: the server has finished, or waits for clients that failed.
            failed = bool(broken) or any(r["failures"] for r in reports)
            stopped = not _exited(server, SERVER_FAILED_WAIT_S if failed else SERVER_FINISH_WAIT_S)
    finally:
        for actor in actors:
            ray.kill(actor)
        _stop(server)
        pump.join(timeout=5)
        ray.shutdown()
    return _reported(reports, broken, count, stopped, server.returncode, still_pending=bool(pending))


def _reported(
    reports: list[dict[str, Any]],
    broken: list[str],
    actors: int,
    stopped: bool,
    server_code: int | None,
    *,
    still_pending: bool,
) -> int:
    """Log what the actors reported; 0 when every client and the server ended well."""
    failures = {int(c): why for r in reports for c, why in r["failures"].items()}
    trained = sum(n for r in reports for n in r["rounds"].values())
    log.info(
        "%d client rounds trained by %d actors (%.0f s of training); %d client(s) failed",
        trained, actors, sum(r["train_seconds"] for r in reports), len(failures),
    )  # fmt: skip
    for client_id, why in sorted(failures.items())[:10]:
        log.error("client %d: %s", client_id, why)
    for why in broken[:10]:
        log.error("%s", why)
    if stopped:
        log.error("fl-sim: every client had left, but fl-server was still running: stopped it")
    elif server_code != 0:
        log.error("fl-sim: fl-server exited %s", server_code)
    return 1 if failures or broken or still_pending or stopped or server_code != 0 else 0


#: How long the actors' last reports may take once fl-server has exited 0: their clients have
#: heard the end, and an actor reports when the last of its clients has.
REPORT_WAIT_S = 60.0


def collect_reports(
    ray: Any, pending: dict[Any, int], server: subprocess.Popen[str], *, timeout_s: float | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The actors' reports as they come (`pending`, Ray's refs to the actor numbers, loses each
    one collected), and the actors that failed as a whole with Ray's word for why. Ends when
    all are in, when fl-server fails, after `timeout_s`, or REPORT_WAIT_S after fl-server exits 0."""
    started = time.monotonic()
    ended: float | None = None  # when fl-server exited 0
    reports: list[dict[str, Any]] = []
    broken: list[str] = []
    while pending:
        if server.poll() is not None:
            if server.returncode != 0:
                break
            ended = time.monotonic() if ended is None else ended
            if time.monotonic() - ended > REPORT_WAIT_S:
                log.error(
                    "fl-sim: fl-server finished, but %d Ray actor(s) did not report within %.0f s",
                    len(pending), REPORT_WAIT_S,
                )  # fmt: skip
                break
        done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        for ref in done:
            actor_number = pending.pop(ref)
            try:
                reports.append(json.loads(ray.get(ref)))
            except Exception as exc:  # Ray wraps whatever the actor raised in errors of its own
                broken.append(f"Ray actor {actor_number}: {_last_line(exc)}")
        if timeout_s and time.monotonic() - started > timeout_s:
            log.error("fl-sim: --timeout %.0f s passed", timeout_s)
            break
    return reports, broken


#: How long the server may take to exit once every client has left: it finishes the last
#: round's bookkeeping and waits up to --finish-grace (15 s) for clients to hear the end.
SERVER_FINISH_WAIT_S = 60.0
#: The same when clients failed: the server would wait for them (up to --join-timeout).
SERVER_FAILED_WAIT_S = 5.0


def _exited(server: subprocess.Popen[str], within_s: float) -> bool:
    try:
        server.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        return False
    return True


def _stop(server: subprocess.Popen[str]) -> None:
    """SIGTERM (the server saves its checkpoint and exits), then SIGKILL after 30 s."""
    if server.poll() is None:
        server.terminate()
        if not _exited(server, 30.0):
            server.kill()
            server.wait()


def _last_line(exc: BaseException) -> str:
    """The last line of an error's text: Ray's errors carry the actor's whole traceback."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    logs.setup("fl-sim")
    try:
        return simulate(parse_args(argv))
    except FedGrpcError as exc:
        print(f"fl-sim: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
