"""A training script made a federated client with fedgrpc.client's few verbs, for the tests.

It "trains" as a light client does (fedgrpc.client.light.light_update, no TensorFlow), reports
the metrics given on its command line with every update, and at the end prints one JSON line:
the rounds it answered and the fedgrpc.client modules it had loaded.

    python tests/script_client.py --server 127.0.0.1:PORT --id 3 --metrics '{"loss": 0.25}'
"""

from __future__ import annotations

import argparse
import json
import sys

import fedgrpc.client as fl
from fedgrpc.client.light import light_examples, light_update


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--metrics", default="{}")
    args = parser.parse_args()
    metrics = json.loads(args.metrics)
    answered = 0
    with fl.connect(args.server, args.id, insecure=True, connect_timeout_s=120) as federation:
        for current in federation.rounds():
            update = light_update(current.weights, args.id, current.number)
            current.submit(update, light_examples(args.id), metrics)
            answered += 1
    loaded = sorted(name for name in sys.modules if name.startswith("fedgrpc.client"))
    print(json.dumps({"rounds": answered, "loaded": loaded}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
