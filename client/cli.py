"""`fl-client`: one participant of a federated run."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedgrpc.common import device, logs
from fedgrpc.common.errors import FedGrpcError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fl-client", description="Train on local data as one client of a federated run."
    )
    p.add_argument(
        "--id", type=int, required=True, dest="client_id", help="this client's id, 1..N (trains shard id-1)"
    )
    p.add_argument(
        "--server", default="localhost:50051", help="coordinator address host:port (default %(default)s)"
    )
    p.add_argument(
        "--data",
        default=os.environ.get("FL_DATA") or None,
        help="training data: a folder, .tar.gz or .npz (default: $FL_DATA, else CIFAR-10 from Keras)",
    )
    p.add_argument(
        "--whole-dataset",
        action="store_true",
        help="train on all of --data instead of shard id-1 (a client that owns its data)",
    )
    p.add_argument(
        "--connect-timeout", type=float, default=60.0, help="seconds to keep retrying an unreachable server"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="cap TensorFlow's CPU threads (e.g. cores / clients)"
    )
    p.add_argument(
        "--take-turns",
        type=Path,
        default=None,
        metavar="LOCKFILE",
        help="train only while holding an exclusive lock on LOCKFILE: clients sharing one machine take turns",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup(f"client {args.client_id}", verbose=args.verbose)
    device.quiet_tensorflow()
    from fedgrpc.client.app import ClientConfig, run_client

    config = ClientConfig(
        client_id=args.client_id,
        server=args.server,
        data=args.data,
        whole_dataset=args.whole_dataset,
        connect_timeout_s=args.connect_timeout,
        threads=args.threads,
        turn_lock=args.take_turns,
        progress=sys.stdout.isatty(),
    )
    try:
        run_client(config)
    except FedGrpcError as exc:
        print(f"fl-client {args.client_id}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fl-client {args.client_id}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
