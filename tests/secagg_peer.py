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
    omit        reveals its shares but leaves out every mask-key share (of neighbours that dropped)
    count       masks an example count far out of range, every round, until it is left out
    withhold    every attempt, reveals its shares but one: the self-mask share of its lowest
                numbered neighbour, a different owner each time once the pair is kept apart
    honest      does everything right (a control)

Vanishing is os._exit: no goodbye, no closed streams, as a crashed client. With --rejoin, a
peer does not vanish: after its misbehaviour it waits for its next instruction and takes part
honestly until the run is finished (share: it stays silent through the rest of the attempt).
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
from fedgrpc.common.config import RunSpec
from fedgrpc.common.errors import SecAggError, StaleRoundError, UpdateRejectedError
from fedgrpc.common.protocol import Instruction


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--id", type=int, required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rejoin", action="store_true")
    args = parser.parse_args()
    if args.mode == "count":
        return _bad_count_every_round(args.server, args.id)
    if args.mode == "withhold":
        return _withhold_a_share_every_attempt(args.server, args.id)
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
            if args.rejoin:
                return _honest_until_finished(connection, run, args.id, 0)
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
        secure.submit(task.round, task.specs, weights, light_examples(args.id), {}, reference=task.weights)
        if args.mode == "submit":
            os._exit(0)
        if args.mode == "lie":
            _lie_when_revealing(connection, args.id)
        if args.mode == "omit":
            _omit_mask_keys_when_revealing(connection)
        secure.reveal()
        print("revealed", flush=True)
        if args.rejoin:
            vars(connection).pop("reveal_shares", None)  # the real one again
            return _honest_until_finished(connection, run, args.id, task.round)
    return 0


def _honest_until_finished(connection: Connection, run: RunSpec, me: int, last: int) -> int:
    """The light client's round loop on this connection: every later attempt done right."""
    while True:
        task = connection.next_task(last, 30)
        if task.instruction is Instruction.FINISHED:
            return 0
        if task.instruction is not Instruction.TRAIN:
            continue
        try:
            secure = SecureRound(connection, run, task.round)
            secure.share_keys()
            weights = light_update(task.weights, me, task.round)
            secure.submit(task.round, task.specs, weights, light_examples(me), {}, reference=task.weights)
            secure.reveal()
            print(f"round {task.round}: revealed", flush=True)
        except (StaleRoundError, SecAggError) as exc:
            print(f"round {task.round}: {exc}", flush=True)
        last = task.round


def _bad_count_every_round(server: str, me: int) -> int:
    """Every round, the masked count word is 2^30 (out of any range) instead of the real count."""
    original = sa.encode

    def encode(*args: Any, **kw: Any) -> list[np.ndarray]:
        words = original(*args, **kw)
        words[-1] = np.array([1 << 30], np.uint32)
        return words

    sa.encode = encode
    with Connection(server, me, connect_timeout_s=60) as connection:
        run, _ = connection.join()
        return _honest_until_finished(connection, run, me, 0)


def _withhold_a_share_every_attempt(server: str, me: int) -> int:
    """Takes part every attempt, but leaves out of each reveal the lowest other owner's self-mask share."""
    with Connection(server, me, connect_timeout_s=60) as connection:
        run, _ = connection.join()
        original = connection.reveal_shares

        def reveal(round_number: int, shares: Any, session: bytes) -> None:
            owners = sorted(owner for owner, kind, _ in shares if kind == "self_mask" and owner != me)
            left_out = owners[0] if owners else None
            print(f"round {round_number}: withholding client {left_out}'s self-mask share", flush=True)
            kept = [s for s in shares if not (s[0] == left_out and s[1] == "self_mask")]
            original(round_number, kept, session)

        connection.reveal_shares = reveal  # type: ignore[method-assign]
        return _honest_until_finished(connection, run, me, 0)


def _omit_mask_keys_when_revealing(connection: Connection) -> None:
    original = connection.reveal_shares

    def reveal(round_number: int, shares: Any, session: bytes) -> None:
        original(round_number, [s for s in shares if s[1] != "mask_key"], session)

    connection.reveal_shares = reveal  # type: ignore[method-assign]


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
