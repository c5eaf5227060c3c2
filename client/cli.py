"""`fl-client`: one participant of a federated run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedgrpc.common import device, logs
from fedgrpc.common.config import DEFAULT_TASK
from fedgrpc.common.errors import ConfigError, FedGrpcError
from fedgrpc.common.settings import site_data
from fedgrpc.common.words import plural

if TYPE_CHECKING:
    from fedgrpc.client.connection import ChannelSecurity


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fl-client", description="Train on local data as one client of a federated run."
    )
    from_env = os.environ.get("FL_CLIENT_ID", "").strip()
    p.add_argument(
        "--id",
        type=int,
        required=not from_env.isdigit(),
        default=int(from_env) if from_env.isdigit() else None,
        dest="client_id",
        help="this client's id, 1..N (trains shard id-1; default: $FL_CLIENT_ID, as a Kubernetes pod index)",
    )
    p.add_argument(
        "--server", default="localhost:50051", help="coordinator address host:port (default %(default)s)"
    )
    p.add_argument(
        "--task",
        default=os.environ.get("FL_TASK") or DEFAULT_TASK,
        help="the task: a file (my_task.py), module:attribute, or an installed task's name; must be "
        "the server's (default: $FL_TASK, else %(default)s, the reference CIFAR-10 job)",
    )
    p.add_argument(
        "--data",
        default=os.environ.get("FL_DATA") or None,
        help="this site's data, as the task reads it; {id} in it becomes the client id "
        "(cifar10: a folder, .tar.gz or .npz; default: $FL_DATA, else CIFAR-10 from Keras)",
    )
    p.add_argument(
        "--connect-timeout", type=float, default=60.0, help="seconds to keep retrying an unreachable server"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="cap the backend's CPU threads (e.g. cores / clients)"
    )
    p.add_argument(
        "--gpu",
        default=None,
        metavar="N[,M]",
        help="use only these GPUs (sets CUDA_VISIBLE_DEVICES); several clients may share one",
    )
    p.add_argument(
        "--take-turns",
        type=Path,
        default=None,
        metavar="LOCKFILE",
        help="train only while holding an exclusive lock on LOCKFILE: clients sharing one machine take turns",
    )
    p.add_argument(
        "--chunk-kb", type=int, default=1024, help="size of the update chunks sent up (default 1024 KiB)"
    )
    p.add_argument(
        "--light",
        action="store_true",
        help="no TensorFlow, no data: send seeded perturbations of the global weights (benchmarks, tests)",
    )
    privacy = p.add_argument_group("local differential privacy (this client trusts nobody to add noise)")
    privacy.add_argument(
        "--local-dp-clip", type=float, default=None, metavar="C", help="clip each update to L2 C"
    )
    privacy.add_argument(
        "--local-dp-noise-multiplier",
        type=float,
        default=None,
        metavar="Z",
        help="add Gaussian noise of std Z*C to each update before it leaves",
    )
    privacy.add_argument(
        "--local-dp-delta", type=float, default=1e-5, help="the delta epsilon is reported for"
    )
    security = p.add_argument_group("security")
    security.add_argument(
        "--ca", type=Path, help="CA certificate that signed the server's certificate: turns on TLS"
    )
    security.add_argument("--tls-cert", type=Path, help="this client's certificate, for mutual TLS")
    security.add_argument("--tls-key", type=Path, help="this client's private key, for mutual TLS")
    security.add_argument(
        "--tls-server-name", help="name in the server's certificate, if not the host dialled"
    )
    security.add_argument(
        "--token", default=os.environ.get("FL_TOKEN") or None, help="this client's token ($FL_TOKEN)"
    )
    security.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="read the token from this file; {id} in the path becomes the client id (a mounted "
        "Secret of many clients' tokens, e.g. /etc/fedgrpc/tokens/client-{id})",
    )
    security.add_argument(
        "--insecure", action="store_true", help="talk to the server without TLS (trusted networks only)"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default="text",
        help="log lines for people or one JSON object a line",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _run(args)
    except FedGrpcError as exc:
        print(f"fl-client {args.client_id}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fl-client {args.client_id}: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    """Check the flags that go together, then take part; every refusal is a ConfigError."""
    logs.setup(f"client {args.client_id}", verbose=args.verbose, log_format=args.log_format)
    device.prepare(args.threads, args.gpu)
    from fedgrpc.client.app import ClientConfig, run_client
    from fedgrpc.client.connection import ChannelSecurity

    if args.ca is None and not args.insecure:
        raise ConfigError(
            "no TLS: give --ca (the server's CA certificate), "
            "or pass --insecure to talk without TLS on a network you trust"
        )
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.ca is None:
        logging.getLogger("fedgrpc.client").warning("INSECURE: talking to %s without TLS", args.server)
    if not 1 <= args.chunk_kb <= 8 << 10:
        raise ConfigError(f"--chunk-kb must be in 1..8192, got {args.chunk_kb}")
    token = args.token
    if args.token_file is not None:
        path = Path(str(args.token_file).replace("{id}", str(args.client_id)))
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {path}: {exc.strerror}") from None
    security = ChannelSecurity(args.ca, args.tls_cert, args.tls_key, token, args.tls_server_name)
    if args.light:
        return _run_light(args, security)

    local_dp = None
    if args.local_dp_clip is not None or args.local_dp_noise_multiplier is not None:
        from fedgrpc.client.app import LocalDP

        if args.local_dp_clip is None or args.local_dp_noise_multiplier is None:
            raise ConfigError("--local-dp-clip and --local-dp-noise-multiplier go together")
        local_dp = LocalDP(args.local_dp_clip, args.local_dp_noise_multiplier, args.local_dp_delta)
    config = ClientConfig(
        client_id=args.client_id,
        server=args.server,
        task=args.task,
        data=site_data(args.data, args.client_id),
        connect_timeout_s=args.connect_timeout,
        threads=args.threads,
        turn_lock=args.take_turns,
        security=security,
        progress=sys.stdout.isatty(),
        chunk_bytes=args.chunk_kb << 10,
        local_dp=local_dp,
    )
    run_client(config)
    return 0


def _run_light(args: argparse.Namespace, security: ChannelSecurity) -> int:
    from fedgrpc.client.light import run_light_client

    stats = run_light_client(
        args.server,
        args.client_id,
        security=security,
        connect_timeout_s=args.connect_timeout,
        chunk_bytes=args.chunk_kb << 10,
    )
    logging.getLogger("fedgrpc.client").info("light client: %s submitted", plural(stats.rounds, "round"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
