"""A client's part in secure aggregation: keys, shares, the masked update, the reveal.

One SecureRound per attempt at a round (fedgrpc.common.secagg has the primitives, the server's
side is fedgrpc.server.secagg):

    round = SecureRound(connection, run, task.round)
    round.share_keys()                      # before training: keys and shares are ready early
    ... train ...
    round.submit(specs, weights, reference, num_examples)
    round.reveal()

Every step raises StaleRoundError when the server aborted this attempt (too few clients at a
stage, shares that did not rebuild) or left this client out of it: the caller asks for its
next instruction, and the round comes back from the same weights.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence

import numpy as np
from fedgrpc.client.connection import Connection
from fedgrpc.common import secagg as sa
from fedgrpc.common.codec import TensorSpec
from fedgrpc.common.config import RunSpec
from fedgrpc.common.errors import SecAggError, StaleRoundError, UpdateRejectedError

log = logging.getLogger("fedgrpc.client")


class SecureRound:
    """This client's secrets and shares for one attempt at one round."""

    def __init__(
        self, connection: Connection, run: RunSpec, round_number: int, *, max_wait_s: float = 30.0
    ) -> None:
        if run.secagg is None:
            raise ValueError("the run has no secure aggregation")
        self._connection, self._run, self.round = connection, run, round_number
        self._spec = run.secagg
        self._me = connection.client_id
        self._max_wait_s = max_wait_s
        self._cipher = sa.new_private_key()
        self._mask = sa.new_private_key()
        self._seed = secrets.token_bytes(sa.SEED_BYTES)
        self._session = b""
        self._peers: dict[int, tuple[bytes, bytes]] = {}  # neighbour -> (cipher key, mask key)
        self._own: tuple[sa.Share, sa.Share] | None = None
        self._held: dict[int, tuple[sa.Share, sa.Share]] = {}  # owner -> (seed share, key share)
        self._threshold = 2

    def share_keys(self) -> None:
        """Advertise fresh keys, then send each neighbour its encrypted shares of our secrets."""
        self._connection.advertise_keys(
            self.round, sa.public_bytes(self._cipher), sa.public_bytes(self._mask), sa.commitment(self._seed)
        )
        stage = self._stage(sa.Step.SHARE)
        self._session = stage.session
        self._peers = {v: (cipher, mask) for v, cipher, mask in stage.neighbours}
        if self._me in self._peers or len(self._peers) != len(stage.neighbours):
            raise SecAggError("the server's neighbour list names this client or one neighbour twice")
        holders = sorted([self._me, *self._peers])
        expected = sa.threshold(len(holders), self._spec.threshold)
        if stage.threshold != expected:
            raise SecAggError(
                f"the server asks for a threshold of {stage.threshold} among {len(holders)} holders; "
                f"the run's secagg threshold gives {expected}: refusing to share"
            )
        self._threshold = expected
        seed_shares = sa.split(self._seed, stage.threshold, len(holders))
        key_shares = sa.split(sa.private_bytes(self._mask), stage.threshold, len(holders))
        ciphertexts = {}
        for position, holder in enumerate(holders):
            pair = (seed_shares[position], key_shares[position])
            if holder == self._me:
                self._own = pair
                continue
            key = sa.agree(self._cipher, self._peers[holder][0], self._context("share", holder))
            plaintext = sa.encode_shares(self._me, *pair)
            ciphertexts[holder] = sa.encrypt(key, plaintext, sa.share_aad(self._me, holder, self.round))
        self._connection.share_keys(self.round, ciphertexts, self._session)

    def submit(
        self,
        specs: Sequence[TensorSpec],
        weights: Sequence[np.ndarray],
        reference: Sequence[np.ndarray],
        num_examples: int,
        metrics: Mapping[str, float] | None = None,
    ) -> tuple[int, int]:
        """Encode the change from `reference`, mask it, and send it (SubmitUpdate, SECAGG)."""
        stage = self._stage(sa.Step.MASK)
        if len(stage.masking) + 1 < self._threshold:
            raise SecAggError(
                f"only {len(stage.masking)} neighbours shared their keys, fewer than the threshold needs: "
                "a masked update would not be hidden well enough; not sent"
            )
        self._held = self._open_shares(stage.shares)
        weight = 1 if self._run.dp_clip > 0 else min(num_examples, self._spec.max_examples)
        if weight < num_examples and self._run.dp_clip == 0:
            log.warning(
                "round %d: %d examples, above the run's secagg max_examples %d: weighted as %d",
                self.round, num_examples, self._spec.max_examples, weight,
            )  # fmt: skip
        changes = [
            np.asarray(w, np.float64) - np.asarray(g, np.float64)
            for w, g in zip(weights, reference, strict=True)
        ]
        if not all(np.isfinite(c).all() for c in changes):  # would encode as 0 with full weight
            raise SecAggError(
                f"round {self.round}: the trained weights hold NaN or infinite values; not sent"
            )
        clipped = sum(int(np.count_nonzero(np.abs(c) > self._spec.bound)) for c in changes)
        if clipped:
            log.debug(
                "round %d: %d values changed by more than the bound %g, clipped",
                self.round,
                clipped,
                self._spec.bound,
            )
        encoded = sa.encode(changes, weight, stage.scale, self._spec.bound)
        words = sa.flatten(encoded)
        sa.apply_mask(words, self._seed, +1)
        for v in stage.masking:
            if v not in self._peers:
                raise SecAggError(f"the server asks to mask with client {v}, which is no neighbour")
            pair = sa.agree(self._mask, self._peers[v][1], self._context("mask", v))
            sa.apply_mask(words, pair, sa.pairwise_sign(self._me, v))
        arrays = sa.unflatten(words, encoded)
        try:
            return self._connection.submit(
                self.round,
                [*specs, TensorSpec(sa.COUNT_TENSOR, "uint32", (1,))],
                arrays,
                1,  # the real count travels masked
                metrics or {},
                method="secagg",
                session=self._session,
            )
        except UpdateRejectedError as exc:
            if exc.code != "ALREADY_EXISTS":  # a retried submit whose first try got through: go on
                raise
            return 0, 0

    def reveal(self) -> None:
        """Send the shares the server may have: seeds of the survivors (ours too), mask keys of
        the neighbours that dropped after sharing."""
        stage = self._stage(sa.Step.UNMASK)
        if self._own is None:
            raise RuntimeError("share_keys was not called")
        if len(stage.survivors) + 1 < self._threshold:
            raise SecAggError(
                f"the server names {len(stage.survivors)} surviving neighbours, fewer than the threshold "
                "needs: refusing to reveal"
            )
        revealed: list[tuple[int, str, sa.Share]] = [(self._me, "self_mask", self._own[0])]
        revealed += [(v, "self_mask", self._held[v][0]) for v in stage.survivors if v in self._held]
        revealed += [(v, "mask_key", self._held[v][1]) for v in stage.dropped if v in self._held]
        if set(stage.survivors) & set(stage.dropped):
            raise SecAggError("the server names a neighbour both survivor and dropped: refusing to reveal")
        self._connection.reveal_shares(self.round, revealed, self._session)

    # -- internals -----------------------------------------------------------------------------

    def _stage(self, step: sa.Step) -> sa.Stage:
        while True:
            stage = self._connection.secagg_stage(self.round, step, self._max_wait_s)
            if stage.status is sa.StageStatus.ABORTED:
                raise StaleRoundError(
                    f"the server aborted round {self.round}'s secure aggregation ({stage.reason}); "
                    "the round is trained again"
                )
            if stage.status is sa.StageStatus.READY:
                if self._session and stage.session != self._session:
                    raise StaleRoundError(f"round {self.round} started again under a new session")
                return stage

    def _context(self, purpose: str, other: int) -> bytes:
        return sa.context(self._run.run_id, self.round, self._session, purpose, *sorted((self._me, other)))

    def _open_shares(self, incoming: Sequence[tuple[int, bytes]]) -> dict[int, tuple[sa.Share, sa.Share]]:
        """Decrypt the neighbours' shares; one that does not decrypt or names another owner is
        left out (its owner's secrets are rebuilt from the other holders)."""
        held = {}
        for owner, ciphertext in incoming:
            try:
                if owner not in self._peers:
                    raise SecAggError("it comes from no neighbour")
                key = sa.agree(self._cipher, self._peers[owner][0], self._context("share", owner))
                named, seed_share, key_share = sa.decode_shares(
                    sa.decrypt(key, ciphertext, sa.share_aad(owner, self._me, self.round))
                )
                if named != owner:
                    raise SecAggError(f"it names client {named} as its owner")
                held[owner] = (seed_share, key_share)
            except SecAggError as exc:
                log.warning("round %d: the shares from client %d are left out: %s", self.round, owner, exc)
        return held
