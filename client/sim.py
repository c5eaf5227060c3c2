"""`fl-sim`: a federation of many clients on Ray, against a real fl-server.

    fl-sim --clients 100 --clients-per-round 10 --rounds 10 [--ray auto] [--cpus-per-client 1]
           [--gpus-per-client 0.25] [--task my_task.py --data data/] [-- more fl-server flags]

The server is a real `fl-server` process; the clients are N client ids served by a pool of
Ray actors (fedgrpc.client.sim_worker.SimWorker), each a real gRPC client of that server
through the same code as `fl-client`, keeping its framework and model warm across the ids it
serves. An actor asks Ray for `--cpus-per-client` CPUs and `--gpus-per-client` GPUs (a
fraction shares a card); there are as many actors as fit (at most one per client training at
once), and ids are dealt to them in turn. With `--clients-per-round K` the server samples K
ready clients a round; the others wait in a long-poll (a thread and an idle call each).

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
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedgrpc.common import logs
from fedgrpc.common.errors import ConfigError, FedGrpcError
from fedgrpc.common.processes import free_port, spawn

log = logging.getLogger("fedgrpc.sim")


def _actor_class(ray: Any) -> Any:
    @ray.remote
    class SimActor:
        """A Ray actor around one SimWorker; JSON in, JSON out."""

        def __init__(self, settings: str) -> None:
            from fedgrpc.client.app import ClientConfig
            from fedgrpc.client.sim_worker import SimWorker

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fl-sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=100, help="client ids 1..N (default %(default)s)")
    p.add_argument(
        "--clients-per-round", type=int, default=None, metavar="K", help="train K sampled clients a round"
    )
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument(
        "--task", default=os.environ.get("FL_TASK") or None, help="the task (default: $FL_TASK, else cifar10)"
    )
    p.add_argument(
        "--data", default=os.environ.get("FL_DATA") or None, help="data, at the same path on every machine"
    )
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument(
        "--ray", default=None, metavar="ADDRESS",
        help="join a running Ray cluster ('auto', or host:port); default: start a local one",
    )  # fmt: skip
    p.add_argument("--actors", type=int, default=None, help="Ray actors (default: as many as fit, at most K)")
    p.add_argument(
        "--cpus-per-client", type=float, default=1.0, help="CPUs each actor asks Ray for (default 1)"
    )
    p.add_argument(
        "--gpus-per-client", type=float, default=0.0, help="GPUs each actor asks for; 0.25: four share a card"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="backend threads per actor (default: its CPUs, rounded up)"
    )
    p.add_argument(
        "--advertise",
        default=None,
        metavar="HOST",
        help="the address actors dial (default: 127.0.0.1, or this node's IP on a cluster)",
    )
    p.add_argument("--logs", type=Path, default=None, help="write the server's log here instead of stderr")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: more fl-server options")
    args = p.parse_args(argv)
    if args.clients < 1 or args.rounds < 1:
        raise ConfigError("--clients and --rounds must be at least 1")
    if args.cpus_per_client <= 0 or args.gpus_per_client < 0:
        raise ConfigError("--cpus-per-client must be positive and --gpus-per-client at least 0")
    args.server_args = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
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
        "--rounds", str(args.rounds), "--clients", str(args.clients), "--out", str(args.out),
        "--join-timeout", "600", *(["--clients-per-round", str(per_round)] if args.clients_per_round else []),
        *(["--task", args.task] if args.task else []), *(["--data", args.data] if args.data else []),
        *args.server_args,
    ]  # fmt: skip
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    server, pump = spawn(server_cmd, args.logs / "server.log" if args.logs else None)
    settings = json.dumps(
        {"server": target, "task": args.task or "cifar10", "data": args.data, "connect_timeout_s": 300.0,
         "threads": args.threads or max(1, math.ceil(args.cpus_per_client))}
    )  # fmt: skip
    actor_class = _actor_class(ray).options(
        num_cpus=args.cpus_per_client,
        num_gpus=args.gpus_per_client,
        runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}},
    )
    actors = [actor_class.remote(settings) for _ in range(count)]
    ids = list(range(1, args.clients + 1))
    pending = {actor.serve.remote(ids[k::count]): k for k, actor in enumerate(actors)}
    log.info(
        "%d client ids on %d Ray actors (%g CPUs, %g GPUs each), %d a round; server at %s",
        args.clients, count, args.cpus_per_client, args.gpus_per_client, per_round, target,
    )  # fmt: skip
    started = time.monotonic()
    reports: list[dict[str, Any]] = []
    try:
        while pending and server.poll() in (None, 0):
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                pending.pop(ref)
                reports.append(json.loads(ray.get(ref)))
            if args.timeout and time.monotonic() - started > args.timeout:
                log.error("fl-sim: --timeout %.0f s passed", args.timeout)
                break
        code = server.wait(timeout=60) if not pending else None
    finally:
        for actor in actors:
            ray.kill(actor)
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)
        pump.join(timeout=5)
        ray.shutdown()
    failures = {int(c): why for r in reports for c, why in r["failures"].items()}
    trained = sum(n for r in reports for n in r["rounds"].values())
    log.info(
        "%d client rounds trained by %d actors (%.0f s of training); %d client(s) failed",
        trained, count, sum(r["train_seconds"] for r in reports), len(failures),
    )  # fmt: skip
    for client_id, why in sorted(failures.items())[:10]:
        log.error("client %d: %s", client_id, why)
    if code != 0 or failures or pending:
        log.error("fl-sim: %s", f"fl-server exited {server.returncode}" if code != 0 else "clients failed")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    logs.setup("fl-sim")
    try:
        return simulate(parse_args(argv))
    except FedGrpcError as exc:
        print(f"fl-sim: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
