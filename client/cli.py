"""`fl-client`: one participant of a federated run."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fedgrpc.common import device, logs, settings
from fedgrpc.common.errors import ConfigError, FedGrpcError
from fedgrpc.common.settings import DATA, TASK, Setting, site_data
from fedgrpc.common.words import plural

if TYPE_CHECKING:
    from fedgrpc.client.connection import ChannelSecurity


_SECURITY = "security"
_LOCAL_DP = "local differential privacy (this client trusts nobody to add noise)"

#: fl-client's settings, declared as fl-server's are (fedgrpc.common.settings).
SETTINGS = (
    Setting(
        "client_id", int, None, low=1, env="FL_CLIENT_ID", flag_name="--id", metavar="N",
        help="this client's id, 1..N (trains shard id-1; default: $FL_CLIENT_ID, as a Kubernetes pod index)",
    ),
    Setting("server", str, "localhost:50051", help="coordinator address host:port (default %(default)s)"),
    replace(
        TASK,
        help="the task: a file (my_task.py), module:attribute, or an installed task's name; must be "
        "the server's (default: $FL_TASK, else %(default)s, the reference CIFAR-10 job)",
    ),
    replace(
        DATA,
        help="this site's data, as the task reads it; {id} in it becomes the client id "
        "(cifar10: a folder, .tar.gz or .npz; default: $FL_DATA, else CIFAR-10 from Keras)",
    ),
    Setting("insecure", bool, False, help="talk to the server without TLS (trusted networks only)"),
    Setting(
        "ca", Path, None, group=_SECURITY,
        help="CA certificate that signed the server's certificate: turns on TLS",
    ),
    Setting(
        "connect_timeout", float, 60.0, above=0, group="the client",
        help="seconds to keep retrying an unreachable server",
    ),
    Setting(
        "threads", int, None, low=0, group="the client",
        help="cap the backend's CPU threads (e.g. cores / clients; 0 or unset: all cores)",
    ),
    Setting(
        "gpu", str, None, metavar="N[,M]", group="the client",
        help="use only these GPUs (sets CUDA_VISIBLE_DEVICES); several clients may share one",
    ),
    Setting(
        "take_turns", Path, None, metavar="LOCKFILE", group="the client",
        help="train only while holding an exclusive lock on LOCKFILE: clients sharing one machine take turns",
    ),
    Setting(
        "chunk_kb", int, 1024, low=1, high=8 << 10, why="(messages stay under 16 MiB)", group="the client",
        help="size of the update chunks sent up (default 1024 KiB)",
    ),
    Setting(
        "light", bool, False, group="the client",
        help="no TensorFlow, no data: send seeded perturbations of the global weights (benchmarks, tests)",
    ),
    Setting("verbose", bool, False, short="-v", group="the client", help="debug lines too"),
    Setting(
        "log_format", str, "text", choices=logs.FORMATS, group="the client",
        help="log lines for people or one JSON object a line",
    ),
    Setting(
        "local_dp_clip", float, None, above=0, metavar="C", group=_LOCAL_DP, help="clip each update to L2 C"
    ),
    Setting(
        "local_dp_noise_multiplier", float, None, low=0, metavar="Z", group=_LOCAL_DP,
        help="add Gaussian noise of std Z*C to each update before it leaves",
    ),
    Setting(
        "local_dp_delta", float, 1e-5, above=0, below=1, group=_LOCAL_DP,
        help="the delta epsilon is reported for",
    ),
    Setting("tls_cert", Path, None, group=_SECURITY, help="this client's certificate, for mutual TLS"),
    Setting("tls_key", Path, None, group=_SECURITY, help="this client's private key, for mutual TLS"),
    Setting(
        "tls_server_name", str, None, group=_SECURITY,
        help="name in the server's certificate, if not the host dialled",
    ),
    Setting("token", str, None, env="FL_TOKEN", group=_SECURITY, help="this client's token ($FL_TOKEN)"),
    Setting(
        "token_file", Path, None, group=_SECURITY,
        help="read the token from this file; {id} in the path becomes the client id (a mounted "
        "Secret of many clients' tokens, e.g. /etc/fedgrpc/tokens/client-{id})",
    ),
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = settings.build_parser(
        SETTINGS, prog="fl-client", description="Train on local data as one client of a federated run."
    )
    args = p.parse_args(argv)
    if args.client_id is None:
        p.error("the following arguments are required: --id (or set $FL_CLIENT_ID)")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except FedGrpcError as exc:
        print(f"fl-client: error: {exc}", file=sys.stderr)
        return 2
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
