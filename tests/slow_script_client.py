"""A script client for the FedBuff tests: light updates (fedgrpc.client.light), each sent after
`--delay` seconds of pretended training; prints one JSON line at the end: the versions it
trained from, in order.

    python tests/slow_script_client.py --server 127.0.0.1:PORT --id 3 --delay 2.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import fedgrpc.client as fl
from fedgrpc.client.light import light_examples, light_update


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each 'training' takes")
    args = parser.parse_args()
    versions = []
    with fl.connect(args.server, args.id, insecure=True, connect_timeout_s=120) as federation:
        for current in federation.rounds():
            time.sleep(args.delay)
            update = light_update(current.weights, args.id, current.number)
            current.submit(update, light_examples(args.id), {})
            versions.append(current.number)
    print(json.dumps({"versions": versions}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
