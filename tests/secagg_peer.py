"""A light client under secure aggregation that misbehaves on purpose, for tests/test_secagg.py.

    python tests/secagg_peer.py --server 127.0.0.1:PORT --id 3 --mode MODE --out weights.npz

It runs the real client code (Connection, SecureRound) for one round, saves the global
weights it was sent (so the test can compute the expected sum), and then, by MODE:

    advertise   vanishes after advertising its keys
    share       vanishes after sharing its keys
    submit      vanishes after submitting its masked update (never reveals)
    lie         reveals garbage in place of the shares it holds of other clients' secrets
    bad-shares  sends one neighbour shares of a different secret (inconsistent shares)
    malformed   submits a masked update without its count tensor, then vanishes
    honest      does everything right (a control)

Vanishing is os._exit: no goodbye, no closed streams, as a crashed client.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from typing import Any

import numpy as np
from fedgrpc.client.connection import Connection
from fedgrpc.client.light import light_examples, light_update
from fedgrpc.client.secagg import SecureRound
from fedgrpc.common import secagg as sa
from fedgrpc.common.errors import UpdateRejectedError
from fedgrpc.common.protocol import Instruction


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with Connection(args.server, args.id, connect_timeout_s=60) as connection:
        run, _ = connection.join()
        task = connection.next_task(0, 30)
        while task.instruction is not Instruction.TRAIN:
            task = connection.next_task(0, 30)
        np.savez(args.out, *task.weights)
        secure = SecureRound(connection, run, task.round)
        if args.mode == "advertise":
            connection.advertise_keys(task.round, secrets.token_bytes(32), _public(), secrets.token_bytes(32))
            os._exit(0)
        if args.mode == "bad-shares":
            _corrupt_first_share()
        secure.share_keys()
        if args.mode == "share":
            os._exit(0)
        weights = light_update(task.weights, args.id, task.round)
        if args.mode == "malformed":
            try:
                connection.submit(
                    task.round,
                    task.specs,
                    [np.asarray(w).view(np.uint32) for w in weights],
                    1,
                    {},
                    method="secagg",
                    session=secure._session,  # of this attempt: the update is refused for its shape
                )
            except UpdateRejectedError as exc:
                print(f"refused: {exc.code}: {exc}", flush=True)
            os._exit(0)
        secure.submit(task.specs, weights, task.weights, light_examples(args.id))
        if args.mode == "submit":
            os._exit(0)
        if args.mode == "lie":
            _lie_when_revealing(connection, args.id)
        secure.reveal()
        print("revealed", flush=True)
    return 0


def _public() -> bytes:
    return sa.public_bytes(sa.new_private_key())


def _corrupt_first_share() -> None:
    """The first neighbour's ciphertext carries shares of other secrets (encrypted correctly)."""
    original = sa.encode_shares
    calls = {"n": 0}

    def encode(owner: int, seed_share: sa.Share, key_share: sa.Share) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            seed_share = sa.Share(seed_share.index, secrets.token_bytes(32))
            key_share = sa.Share(key_share.index, secrets.token_bytes(32))
        return original(owner, seed_share, key_share)

    sa.encode_shares = encode  # type: ignore[assignment]


def _lie_when_revealing(connection: Connection, me: int) -> None:
    original = connection.reveal_shares

    def reveal(round_number: int, shares: Any, session: bytes) -> None:
        forged = [
            (owner, kind, share if owner == me else sa.Share(share.index, secrets.token_bytes(32)))
            for owner, kind, share in shares
        ]
        original(round_number, forged, session)

    connection.reveal_shares = reveal  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.exit(main())
