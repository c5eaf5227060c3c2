"""A client that misbehaves on purpose, for tests/test_promises_*.py.

    python tests/rogue_peer.py --server 127.0.0.1:PORT --id 5 --mode MODE --out FOLDER

It runs the real client connection (join, long-poll, streamed weights) and saves the global
weights of every round it is asked to train as FOLDER/round-N.npz, so a test can recompute
what the server must have made of that round. By MODE:

    poison  every round, sends the light update of its id with its change flipped and scaled
            ten times (as bench/poisoning.py's sign-flip attack), and claims a million examples
    stall   takes round 1's weights, prints "round 1: training", and never answers again (a
            test kills it there, before its first update)
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import numpy as np
from fedgrpc.client.connection import Connection
from fedgrpc.client.light import light_update
from fedgrpc.common.protocol import Instruction

#: The example count a poisoned update claims: robust strategies must not weight by it.
CLAIMED_EXAMPLES = 1_000_000


def poisoned(global_weights: list[np.ndarray], client_id: int, round_number: int) -> list[np.ndarray]:
    """The light update of `client_id`, its change from the global weights times -10."""
    honest = light_update(global_weights, client_id, round_number)
    return [(g - 10 * (h - g)).astype(g.dtype) for g, h in zip(global_weights, honest, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--mode", choices=("poison", "stall"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with Connection(args.server, args.id, connect_timeout_s=90) as connection:
        connection.join()
        last_round = 0
        while True:
            task = connection.next_task(last_round, 30)
            if task.instruction is Instruction.FINISHED:
                return 0
            if task.instruction is Instruction.WAIT:
                continue
            if task.instruction is Instruction.EVALUATE:
                connection.submit_evaluation(task.round, 0, {})
                continue
            weights = [np.asarray(w) for w in task.weights]
            np.savez(args.out / f"round-{task.round}.npz", *weights)
            if args.mode == "stall":
                print(f"round {task.round}: training", flush=True)
                threading.Event().wait()  # until killed
            update = poisoned(weights, args.id, task.round)
            connection.submit(task.round, task.specs, update, CLAIMED_EXAMPLES, {"loss": 0.0})
            print(f"round {task.round}: poisoned update sent", flush=True)
            last_round = task.round


if __name__ == "__main__":
    sys.exit(main())
