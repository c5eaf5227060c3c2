"""A client's part in secure aggregation: keys, shares, the masked update, the reveal.

One attempt at a round (fedgrpc.common.secagg has the primitives, the server's side is
fedgrpc.server.secagg), in this order:

    created --share_keys--> shared --submit--> submitted --reveal--> revealed
        (advertise keys, wait    (wait for "mask",      (wait for "unmask",
         for "share", send        send the masked        send the shares the
         each neighbour its       update)                server may have)
         encrypted shares)

Keys and shares go before training, so that they are ready when training ends. Every step
raises StaleRoundError when the server aborted this attempt (too few clients at a stage,
shares that did not rebuild) or left this client out of it: the caller asks for its next
instruction, and the round comes back from the same weights.

SecureSteps is the attempt written once, as coroutines over a Link (fedgrpc.client.link): a
light client awaits them on its event loop. SecureRound is the same attempt on a blocking
Connection, for code that is blocking all through (tests, tools):

    secure = SecureRound(connection, run, assignment.round)
    secure.share_keys()
    ... train ...
    secure.submit(assignment.round, specs, weights, num_examples, timings, reference=assignment.weights)
    secure.reveal()
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence

import numpy as np

from ..common import secagg as sa
from ..common.codec import TensorSpec
from ..common.config import RunSpec
from ..common.errors import SecAggError, StaleRoundError, UpdateRejectedError
from .connection import Connection
from .link import BlockingLink, Link, run_blocking

log = logging.getLogger("fedgrpc.client")


class SecureSteps:
    """This client's secrets and shares for one attempt at one round, its steps as coroutines."""

    def __init__(self, link: Link, run: RunSpec, round_number: int, *, max_wait_s: float = 30.0) -> None:
        if run.secagg is None:
            raise ValueError("the run has no secure aggregation")
        self.link, self.run, self.round = link, run, round_number
        self.spec = run.secagg
        self.me = link.client_id
        self.max_wait_s = max_wait_s
        self._cipher = sa.new_private_key()
        self._mask = sa.new_private_key()
        self._seed = secrets.token_bytes(sa.SEED_BYTES)
        self.session = b""
        self.peers: dict[int, tuple[bytes, bytes]] = {}  # neighbour -> (cipher key, mask key)
        self._own: tuple[sa.Share, sa.Share] | None = None
        self.held: dict[int, tuple[sa.Share, sa.Share]] = {}  # owner -> (seed share, key share)
        self._threshold = 2

    async def share_keys(self) -> None:
        """Advertise fresh keys, then send each neighbour its encrypted shares of our secrets."""
        await self.link.advertise_keys(
            self.round, sa.public_bytes(self._cipher), sa.public_bytes(self._mask), sa.commitment(self._seed)
        )
        stage = await self.stage(sa.Step.SHARE)
        self.session = stage.session
        self.peers = {v: (cipher, mask) for v, cipher, mask in stage.neighbours}
        if self.me in self.peers or len(self.peers) != len(stage.neighbours):
            raise SecAggError("the server's neighbour list names this client or one neighbour twice")
        holders = sorted([self.me, *self.peers])
        expected = sa.threshold(len(holders), self.spec.threshold)
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
            if holder == self.me:
                self._own = pair
                continue
            key = sa.agree(self._cipher, self.peers[holder][0], self._context("share", holder))
            plaintext = sa.encode_shares(self.me, *pair)
            ciphertexts[holder] = sa.encrypt(key, plaintext, sa.share_aad(self.me, holder, self.round))
        await self.link.share_keys(self.round, ciphertexts, self.session)

    async def submit(
        self,
        round_number: int,
        specs: Sequence[TensorSpec],
        weights: Sequence[np.ndarray],
        num_examples: int,
        metrics: Mapping[str, float],
        *,
        reference: Sequence[np.ndarray] = (),
    ) -> tuple[int, int]:
        """Encode the change from `reference`, mask it, and send it (SubmitUpdate, SECAGG) with
        `metrics`, which may hold timings only. (0, 0): a retried submit the server already had."""
        if round_number != self.round or len(reference) != len(weights):
            raise ValueError(
                f"a masked update of round {self.round} needs its weights and the reference they changed "
                f"from (got round {round_number}, {len(weights)} weights, {len(reference)} references)"
            )
        stage = await self.stage(sa.Step.MASK)
        if len(stage.masking) + 1 < self._threshold:
            raise SecAggError(
                f"only {len(stage.masking)} neighbours shared their keys, fewer than the threshold needs: "
                "a masked update would not be hidden well enough; not sent"
            )
        self.held = self.open_shares(stage.shares)
        arrays = self._masked(stage, self._encoded(stage, weights, reference, num_examples))
        try:
            return await self.link.submit(
                self.round,
                [*specs, TensorSpec(sa.COUNT_TENSOR, "uint32", (1,))],
                arrays,
                1,  # the real count travels masked
                metrics,
                method="secagg",
                session=self.session,
            )
        except UpdateRejectedError as exc:
            if exc.code != "ALREADY_EXISTS":  # a retried submit whose first try got through: go on
                raise
            return 0, 0

    async def reveal(self) -> None:
        """Send the shares the server may have: seeds of the survivors (ours too), mask keys of
        the neighbours that dropped after sharing."""
        stage = await self.stage(sa.Step.UNMASK)
        if self._own is None:
            raise RuntimeError("share_keys was not called")
        if len(stage.survivors) + 1 < self._threshold:
            raise SecAggError(
                f"the server names {len(stage.survivors)} surviving neighbours, fewer than the threshold "
                "needs: refusing to reveal"
            )
        revealed: list[tuple[int, sa.ShareKind, sa.Share]] = [(self.me, sa.ShareKind.SELF_MASK, self._own[0])]
        revealed += [(v, sa.ShareKind.SELF_MASK, self.held[v][0]) for v in stage.survivors if v in self.held]
        revealed += [(v, sa.ShareKind.MASK_KEY, self.held[v][1]) for v in stage.dropped if v in self.held]
        if set(stage.survivors) & set(stage.dropped):
            raise SecAggError("the server names a neighbour both survivor and dropped: refusing to reveal")
        await self.link.reveal_shares(self.round, revealed, self.session)

    async def stage(self, step: sa.Step) -> sa.Stage:
        """Wait until the server lets `step` start; StaleRoundError if it aborted the attempt."""
        while True:
            stage = await self.link.secagg_stage(self.round, step, self.max_wait_s)
            if stage.status is sa.StageStatus.ABORTED:
                raise StaleRoundError(
                    f"the server aborted round {self.round}'s secure aggregation ({stage.reason}); "
                    "the round is trained again"
                )
            if stage.status is sa.StageStatus.READY:
                if self.session and stage.session != self.session:
                    raise StaleRoundError(f"round {self.round} started again under a new session")
                return stage

    def open_shares(self, incoming: Sequence[tuple[int, bytes]]) -> dict[int, tuple[sa.Share, sa.Share]]:
        """Decrypt the neighbours' shares; one that does not decrypt or names another owner is
        left out (its owner's secrets are rebuilt from the other holders)."""
        held = {}
        for owner, ciphertext in incoming:
            try:
                if owner not in self.peers:
                    raise SecAggError("it comes from no neighbour")
                key = sa.agree(self._cipher, self.peers[owner][0], self._context("share", owner))
                named, seed_share, key_share = sa.decode_shares(
                    sa.decrypt(key, ciphertext, sa.share_aad(owner, self.me, self.round))
                )
                if named != owner:
                    raise SecAggError(f"it names client {named} as its owner")
                held[owner] = (seed_share, key_share)
            except SecAggError as exc:
                log.warning("round %d: the shares from client %d are left out: %s", self.round, owner, exc)
        return held

    # -- internals -----------------------------------------------------------------------------

    def _encoded(
        self,
        stage: sa.Stage,
        weights: Sequence[np.ndarray],
        reference: Sequence[np.ndarray],
        num_examples: int,
    ) -> list[np.ndarray]:
        """The change from `reference`, weighted and encoded in the ring (before masking)."""
        weight = 1 if self.run.dp_clip > 0 else min(num_examples, self.spec.max_examples)
        if weight < num_examples and self.run.dp_clip == 0:
            log.warning(
                "round %d: %d examples, above the run's secagg max_examples %d: weighted as %d",
                self.round, num_examples, self.spec.max_examples, weight,
            )  # fmt: skip
        changes = [
            np.asarray(w, np.float64) - np.asarray(g, np.float64)
            for w, g in zip(weights, reference, strict=True)
        ]
        if not all(np.isfinite(c).all() for c in changes):  # would encode as 0 with full weight
            raise SecAggError(
                f"round {self.round}: the trained weights hold NaN or infinite values; not sent"
            )
        clipped = sum(int(np.count_nonzero(np.abs(c) > self.spec.bound)) for c in changes)
        if clipped:
            log.debug(
                "round %d: %d values changed by more than the bound %g, clipped",
                self.round,
                clipped,
                self.spec.bound,
            )
        return sa.encode(changes, weight, stage.scale, self.spec.bound)

    def _masked(self, stage: sa.Stage, encoded: list[np.ndarray]) -> list[np.ndarray]:
        words = sa.flatten(encoded)
        sa.apply_mask(words, self._seed, +1)
        for v in stage.masking:
            if v not in self.peers:
                raise SecAggError(f"the server asks to mask with client {v}, which is no neighbour")
            pair = sa.agree(self._mask, self.peers[v][1], self._context("mask", v))
            sa.apply_mask(words, pair, sa.pairwise_sign(self.me, v))
        return sa.unflatten(words, encoded)

    def _context(self, purpose: str, other: int) -> bytes:
        return sa.context(self.run.run_id, self.round, self.session, purpose, *sorted((self.me, other)))


class SecureRound:
    """SecureSteps on a blocking Connection: the same attempt, its steps as blocking calls."""

    def __init__(
        self, connection: Connection, run: RunSpec, round_number: int, *, max_wait_s: float = 30.0
    ) -> None:
        self._connection = connection
        self.steps = SecureSteps(BlockingLink(connection), run, round_number, max_wait_s=max_wait_s)
        self.round = round_number

    @property
    def _session(self) -> bytes:
        """The attempt's session, once keys are shared (what a masked update is sent under)."""
        return self.steps.session

    def share_keys(self) -> None:
        run_blocking(self.steps.share_keys())

    def submit(
        self,
        round_number: int,
        specs: Sequence[TensorSpec],
        weights: Sequence[np.ndarray],
        num_examples: int,
        metrics: Mapping[str, float],
        *,
        reference: Sequence[np.ndarray] = (),
    ) -> tuple[int, int]:
        sending = self.steps.submit(round_number, specs, weights, num_examples, metrics, reference=reference)
        return run_blocking(sending)

    def reveal(self) -> None:
        run_blocking(self.steps.reveal())

    def _stage(self, step: sa.Step) -> sa.Stage:
        return run_blocking(self.steps.stage(step))
