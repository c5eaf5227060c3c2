"""Secure aggregation on the server: it relays what it cannot read and learns only the sum.

One SecAggRound per training round (fedgrpc.common.secagg has the primitives):

    advertise --close--> share --close--> mask --close--> unmask --close--> done
        |                  |                |                 |
        +------------------+----------------+-----------------+--> aborted (too few clients)

- advertise: each sampled client sends two X25519 public keys and a commitment to its self-mask
  seed. U1: those that did. The neighbour graph (complete for small rounds, SecAgg+'s Harary
  graph beyond) is drawn over U1, seeded by the run and round.
- share: each client sends, for every neighbour, an encrypted pair of Shamir shares (its seed,
  its mask key). U2: those that did; the encoding scale is fixed from |U2|.
- mask: each client of U2 gets the ciphertexts addressed to it, trains, and submits its masked
  update through SubmitUpdate (compression SECAGG), folded into a uint32 running sum as it
  streams in (O(model) memory). U3: the updates accepted.
- unmask: each client of U3 reveals, for each neighbour, the seed share if that neighbour is in
  U3, the mask-key share if it dropped after sharing (never both). The server rebuilds each
  seed and key from enough shares, checks it against the commitment or public key (trying
  other subsets of shares when one disagrees, and naming who sent it), and removes the masks.

Groups (fedgrpc.server.isolation decides them): after an impossible sum, an attempt may split
its clients into disjoint groups, each its own neighbour graph, masked sum and check, so that a
client sending ring words that are no encoded update spoils only its own group's sum; or it may
be one group that leaves some suspects out (they sit the attempt out: told no keys, as a client
without a neighbour). Every such group left with fewer than MIN_GROUP_SIZE masked updates is not
unmasked. With no groups given (the normal case) this is the protocol above, unchanged.

Disputes (a holder that reveals without a share it should hold): see fedgrpc.server.unmasking.

A stage closes when every expected client has acted, or after `stage_timeout_s`. Up to the
threshold's slack, clients may vanish at any stage after advertising and the round still yields
the exact sum of the survivors; with too few, the round is aborted: no partial result, the next
round starts from the same weights.

What it does not protect against: a server that lies about who dropped (it could learn one
client's update by claiming it dropped to some and survived to others: Bonawitz et al.'s
signatures and consistency round are not implemented), and the sum itself, which the server
learns by design. It excludes what needs to see single updates: robust rules, per-update value
checks (shape, dtype and size checks stay), update compression.

Threads: handlers call the client-side methods, the driver the `close_*` ones; one lock.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from ..common import secagg as sa
from ..common.config import SecAggSpec
from ..common.errors import SecAggError, StaleRoundError
from . import unmasking
from .isolation import MIN_GROUP_SIZE

log = logging.getLogger(__name__)

STAGES = ("advertise", "share", "mask", "unmask", "unmasking", "done", "aborted")
_MAX_CIPHERTEXT = 256  # a share's ciphertext is 12 + 70 + 16 bytes


@dataclass
class _Client:
    cipher_key: bytes
    mask_key: bytes
    commitment: bytes
    shares_sent: dict[int, bytes] = field(default_factory=dict)  # recipient -> ciphertext
    reveals: list[tuple[int, str, sa.Share]] = field(default_factory=list)  # (revealer, kind, share)


class SecAggRound:
    """The secure aggregation of one attempt at a round: who did what, and the unmasking."""

    def __init__(
        self,
        run_id: str,
        number: int,
        participants: Sequence[int],
        spec: SecAggSpec,
        *,
        on_change: Callable[[], None] = lambda: None,
        groups: Sequence[frozenset[int]] = (),
        apart: frozenset[frozenset[int]] = frozenset(),
    ) -> None:
        """`groups`: disjoint sets of participants aggregated apart (none: one group of all);
        `apart`: pairs that must not be neighbours (earlier disputes)."""
        self.run_id, self.number, self.spec = run_id, number, spec
        self.session = secrets.token_bytes(16)
        self.participants = frozenset(participants)
        self.groups = [frozenset(g) & self.participants for g in groups] or [self.participants]
        self.isolating = bool(groups)  # groups of a suspecting attempt: each keeps MIN_GROUP_SIZE
        self.apart = apart
        self.group_of: dict[int, int] = {}  # client -> index in self.groups, once keys are advertised
        self.stage = "advertise"
        self.reason = ""
        self._on_change = on_change
        self._lock = threading.Condition()
        self.clients: dict[int, _Client] = {}
        self.graph: dict[int, list[int]] = {}
        self.thresholds: dict[int, int] = {}
        self.shared: frozenset[int] = frozenset()  # U2
        self.submitted: frozenset[int] = frozenset()  # U3
        self.scale = 0.0
        self.suspects: set[int] = set()  # revealers whose shares did not fit the others (logged)
        # Owners whose secret could not be rebuilt although enough of its holders answered: it
        # sent shares that do not decrypt or do not fit together. Left out of later rounds.
        self.culprits: set[int] = set()
        self.disputes: set[frozenset[int]] = set()  # (owner, holder) pairs: a share missing between them
        self.counted: frozenset[int] = frozenset()  # clients whose group's sum was used
        self.failed: list[tuple[frozenset[int], str]] = []  # groups whose sum was impossible, and why
        self.revealed: set[int] = set()
        self._opened = time.monotonic()
        self._unmask_started = self._opened
        self._seconds = {"keys": 0.0, "unmask": 0.0}

    # -- client steps (handlers) ---------------------------------------------------------------

    def advertise(self, client: int, cipher_key: bytes, mask_key: bytes, commitment: bytes) -> None:
        with self._lock:
            self._expect(client, "advertise", self.participants)
            if len(cipher_key) != 32 or len(mask_key) != 32 or len(commitment) != 32:
                raise SecAggError("the two public keys and the commitment are 32 bytes each")
            sa.check_public_key(cipher_key)  # refuses keys no exchange works with (low order)
            sa.check_public_key(mask_key)
            self.clients[client] = _Client(cipher_key, mask_key, commitment)  # again: replaced
            self._lock.notify_all()

    def share(self, client: int, ciphertexts: dict[int, bytes], session: bytes) -> None:
        with self._lock:
            self._expect(client, "share", frozenset(self.graph), session)
            expected = set(self.graph[client])
            if set(ciphertexts) != expected:
                raise SecAggError(
                    f"client {client} must send one ciphertext to each of its {len(expected)} neighbours "
                    f"and no one else; got {len(ciphertexts)}, for {sorted(ciphertexts)[:8]}"
                )
            if any(not 0 < len(c) <= _MAX_CIPHERTEXT for c in ciphertexts.values()):
                raise SecAggError(f"a share's ciphertext holds 1 to {_MAX_CIPHERTEXT} bytes")
            self.clients[client].shares_sent = dict(ciphertexts)
            self._lock.notify_all()

    def reveal(self, client: int, shares: Sequence[tuple[int, str, sa.Share]], session: bytes) -> None:
        with self._lock:
            self._expect(client, "unmask", self.submitted, session)
            if client in self.revealed:
                return  # a retried call whose first try got through
            unmasking.check_reveals(self, client, shares)
            for owner, kind, share in shares:
                self.clients[owner].reveals.append((client, kind, share))
            self.revealed.add(client)
            self._lock.notify_all()

    def view(self, client: int, step: sa.Step) -> sa.Stage | None:
        """What `client` needs for `step` once the server has moved past the stage before it:
        None while it has not, an ABORTED stage if this attempt was aborted."""
        with self._lock:
            if self.stage == "aborted":
                return sa.Stage(sa.StageStatus.ABORTED, self.session, reason=self.reason or "aborted")
            if STAGES.index(self.stage) < STAGES.index(step):
                return None
            if step is sa.Step.SHARE and self.stage != "share":
                raise StaleRoundError(
                    f"round {self.number}'s keys were shared already (it is at {self.stage}): too late"
                )
            if client not in self.graph or (step is not sa.Step.SHARE and client not in self.shared):
                raise StaleRoundError(
                    f"client {client} takes no part in round {self.number}'s secure aggregation from the "
                    f"{step} step on (it did not take the steps before in time); it waits for the next round"
                )
            mine = self.graph[client]
            ready = partial(sa.Stage, sa.StageStatus.READY, self.session)
            if step is sa.Step.SHARE:
                keys = tuple((v, self.clients[v].cipher_key, self.clients[v].mask_key) for v in mine)
                return ready(neighbours=keys, threshold=self.thresholds[client])
            if step is sa.Step.MASK:
                incoming = tuple((u, self.clients[u].shares_sent[client]) for u in mine if u in self.shared)
                masking = tuple(v for v in mine if v in self.shared)
                return ready(scale=self.scale, shares=incoming, masking=masking)
            if client not in self.submitted:
                raise StaleRoundError(
                    f"client {client}'s masked update of round {self.number} was not counted"
                )
            return ready(
                survivors=tuple(v for v in mine if v in self.submitted),
                dropped=tuple(v for v in mine if v in self.shared and v not in self.submitted),
            )

    def may_start(self, client: int) -> bool:
        """Whether `client` may be told to train this attempt: keys are still being advertised and
        it has not advertised yet (a client that dropped out of a step waits for the next round)."""
        with self._lock:
            return self.stage == "advertise" and client in self.participants and client not in self.clients

    def may_submit(self, client: int, session: bytes) -> None:
        with self._lock:
            self._same_session(session)
            if self.stage != "mask" or client not in self.shared:
                raise StaleRoundError(
                    f"client {client} cannot submit a masked update of round {self.number} now: its secure "
                    f"aggregation is at {self.stage}, and only clients that shared their keys may"
                )

    # -- the driver's side -------------------------------------------------------------------------

    def run_key_stages(self, timeout_s: float, stopping: Callable[[], bool]) -> bool:
        """Advertise, then share: each closes when everyone expected has acted, or after
        `timeout_s`. False: aborted (or stopping)."""
        self._wait(lambda: len(self.clients) >= len(self.participants), timeout_s, stopping)
        if stopping() or not self._close_advertise():
            return False
        expected = len(self.graph)
        self._wait(lambda: self._shared_count() >= expected, timeout_s, stopping)
        return not stopping() and self._close_share()

    def summary(self) -> dict[str, float]:
        """Who took each step, and the seconds the key steps and the unmasking took (history)."""
        with self._lock:
            return {
                "advertised": len(self.graph),
                "shared": len(self.shared),
                "submitted": len(self.submitted),
                "neighbours": max((len(vs) for vs in self.graph.values()), default=0),
                "key_seconds": round(self._seconds["keys"], 3),
                "unmask_seconds": round(self._seconds["unmask"], 3),
            }

    def run_unmasking(self, submitted: Sequence[int], timeout_s: float, stopping: Callable[[], bool]) -> bool:
        """Close the masked input, wait for the survivors' shares. False: aborted."""
        self._unmask_started = time.monotonic()
        with self._lock:
            arrived = frozenset(submitted) & self.shared
            if not arrived:
                return self._abort("no masked update arrived")
            _say_who_is_missing(self.number, "submitted a masked update", arrived, self.shared)
            self.submitted = arrived
            if self.isolating:  # a small group's sum says too much about each update: not unmasked
                sizes = Counter(self.group_of[c] for c in arrived)
                alone = [c for c in arrived if sizes[self.group_of[c]] < MIN_GROUP_SIZE]
                if alone:
                    log.info(
                        "round %d: client(s) %s are in a group of fewer than %d masked updates; not unmasked",
                        self.number, sorted(alone), MIN_GROUP_SIZE,
                    )  # fmt: skip
                self.submitted = arrived - frozenset(alone)
                if not self.submitted:
                    return self._abort(f"no group holds {MIN_GROUP_SIZE} masked updates")
            self.stage = "unmask"
        self._on_change()
        self._wait(lambda: len(self.revealed) >= len(self.submitted), timeout_s, stopping)
        with self._lock:
            if self.stage == "aborted":
                return False
            revealed = frozenset(self.revealed)
            _say_who_is_missing(self.number, "revealed their shares", revealed, self.submitted)
        return True

    def abort(self, reason: str) -> None:
        with self._lock:
            if self.stage not in ("done", "aborted"):
                self._abort(reason)

    def groups_submitted(self) -> dict[int, frozenset[int]]:
        """Each group's counted-so-far clients (after run_unmasking), by group index."""
        out: dict[int, set[int]] = {}
        for c in self.submitted:
            out.setdefault(self.group_of[c], set()).add(c)
        return {index: frozenset(members) for index, members in sorted(out.items())}

    def unmask(self, masked_sums: dict[int, list[np.ndarray]]) -> dict[int, list[np.ndarray]]:
        """Each group's true sum, by group index, the masks removed (SecAggError: too few or
        inconsistent shares).

        Rebuilding secrets takes milliseconds each, so it runs outside the lock: the stage is
        "unmasking" meanwhile, no share can arrive, and handlers keep answering."""
        with self._lock:
            if self.stage != "unmask":
                raise SecAggError(f"round {self.number}'s secure aggregation cannot unmask at {self.stage}")
            self.stage = "unmasking"
        try:
            seeds, keys = unmasking.rebuild_secrets(self)
        except SecAggError as exc:
            with self._lock:
                self._abort(str(exc))
            raise
        try:
            return unmasking.remove_masks(self, masked_sums, seeds, keys)
        finally:
            with self._lock:
                self.stage = "done"
            self._seconds["unmask"] = time.monotonic() - self._unmask_started

    # -- internals --------------------------------------------------------------------------------

    def _wait(self, done: Callable[[], bool], timeout_s: float, stopping: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or stopping():
                    return False
                self._lock.wait(min(remaining, 0.5))  # also looks at `stopping` twice a second
            return True

    def _shared_count(self) -> int:
        return sum(1 for c in self.clients.values() if c.shares_sent)

    def _close_advertise(self) -> bool:
        with self._lock:
            advertised = sorted(self.clients)
            if len(advertised) < 2:
                return self._abort(f"{len(advertised)} client(s) advertised keys; secure aggregation needs 2")
            _say_who_is_missing(self.number, "advertised keys", advertised, self.participants)
            self.graph = self._draw_graph(advertised)
            if len(self.graph) < 2:
                return self._abort(
                    f"{len(self.graph)} client(s) advertised keys and have a neighbour; "
                    "secure aggregation needs 2"
                )
            self.thresholds = {
                u: sa.threshold(len(vs) + 1, self.spec.threshold) for u, vs in self.graph.items()
            }
            self.stage = "share"
        self._on_change()
        return True

    def _draw_graph(self, advertised: Sequence[int]) -> dict[int, list[int]]:
        """Each group's neighbour graph over its advertised clients, less the disputed pairs;
        a client left with no neighbour sits this attempt out (lock held)."""
        graph: dict[int, list[int]] = {}
        seed = f"{self.run_id}|{self.number}|{self.session.hex()}"
        for index, group in enumerate(self.groups):
            members = sorted(group & set(advertised))
            drawn = sa.neighbours(members, seed if len(self.groups) == 1 else f"{seed}|{index}")
            for u, vs in drawn.items():
                kept = [v for v in vs if frozenset((u, v)) not in self.apart]
                if kept:
                    graph[u] = kept
                    self.group_of[u] = index
        grouped = frozenset().union(*self.groups)
        lonely = sorted((set(advertised) & grouped) - set(graph))
        if lonely:
            log.warning(
                "round %d: client(s) %s have no neighbour to aggregate with this attempt (disputes or a "
                "group of one); they sit it out", self.number, lonely[:10],
            )  # fmt: skip
        return graph

    def _close_share(self) -> bool:
        with self._lock:
            shared = sorted(u for u, c in self.clients.items() if c.shares_sent)
            if len(shared) < 2:
                return self._abort(f"{len(shared)} client(s) shared their keys; secure aggregation needs 2")
            try:
                self.scale = sa.ring_scale(len(shared), self.spec.max_examples, self.spec.bound)
            except SecAggError as exc:
                return self._abort(str(exc))
            _say_who_is_missing(self.number, "shared keys", shared, frozenset(self.graph))
            self.shared = frozenset(shared)
            self.stage = "mask"
            self._seconds["keys"] = time.monotonic() - self._opened
        self._on_change()
        return True

    def _same_session(self, session: bytes) -> None:
        if session != self.session:
            raise StaleRoundError(
                f"this message belongs to another attempt at round {self.number} (its session differs): "
                "ask for the next instruction"
            )

    def _expect(self, client: int, stage: str, allowed: frozenset[int], session: bytes | None = None) -> None:
        if session is not None:
            self._same_session(session)
        if self.stage != stage:
            raise StaleRoundError(f"round {self.number}'s secure aggregation is at {self.stage}, not {stage}")
        if client not in allowed:
            raise StaleRoundError(f"client {client} takes no part in this step of round {self.number}")

    def _abort(self, reason: str) -> bool:
        self.stage, self.reason = "aborted", reason
        self._lock.notify_all()
        log.warning("round %d: secure aggregation aborted: %s", self.number, reason)
        self._on_change()
        return False


def _say_who_is_missing(
    number: int, did: str, done: Sequence[int] | frozenset[int], expected: frozenset[int]
) -> None:
    missing = sorted(expected - set(done))
    if missing:
        log.info(
            "round %d: %d of %d clients %s; going on without %s",
            number, len(done), len(expected), did, ", ".join(f"client {c}" for c in missing[:10]),
        )  # fmt: skip
