"""Unmasking a secure aggregation: rebuilding each secret from the revealed shares, then
removing the masks from each group's sum (fedgrpc.server.secagg's `unmask` step).

Each survivor's self-mask seed is rebuilt and checked against its commitment, each client that
dropped after sharing has its mask key rebuilt and checked against its public key; subsets of
the shares are tried when the first ones disagree, and whoever sent a share that does not fit
is named (`suspects`), an owner whose shares fit no subset is a culprit, and a holder that
revealed without a share it should hold is in dispute with its owner. It runs without the
round's lock: the round is at "unmasking", where nothing it reads can change.

Disputes: a holder that reveals but holds no share of an owner's secret either got a share
that did not decrypt (the owner's fault) or holds it back (its own): the server cannot tell.
The pair is recorded, and later attempts draw no edge between the two, so neither can spoil
the other's round again, and neither is excluded for it. An attempt that recorded a new pair
is no failure to count (fedgrpc.server.masked_sum), and the pairs are kept in the checkpoint.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from ..common import secagg as sa
from ..common.errors import SecAggError

if TYPE_CHECKING:
    from .secagg import SecAggRound

log = logging.getLogger("fedgrpc.server.secagg")
T = TypeVar("T")
#: What a revealed share can be of.
KINDS = tuple(sa.ShareKind)
#: Subsets of shares tried when the first ones do not rebuild a committed secret.
MAX_REBUILD_ATTEMPTS = 200


def check_reveals(secure: SecAggRound, client: int, shares: Sequence[tuple[int, str, sa.Share]]) -> None:
    """What `client` reveals: at most one share of each owner it holds a share of, the seed
    share of a survivor or the key share of a client that dropped after sharing, never both."""
    holders = set(secure.graph[client]) | {client}
    seen: set[int] = set()
    for owner, kind, share in shares:
        if owner in seen:
            raise SecAggError(f"client {client} revealed two shares of client {owner}")
        seen.add(owner)
        if owner not in holders or owner not in secure.shared:
            raise SecAggError(f"client {client} holds no share of client {owner}")
        owners_holders = len(secure.graph[owner]) + 1  # the x-coordinates the owner used
        if kind not in KINDS or len(share.value) != 32 or not 1 <= share.index <= owners_holders:
            raise SecAggError("a revealed share is a self-mask or mask-key share of 32 bytes")
        if kind == "self_mask" and owner not in secure.submitted:
            raise SecAggError(f"client {owner}'s update was not counted: its self-mask seed is not asked for")
        if kind == "mask_key" and owner in secure.submitted:
            raise SecAggError(f"client {owner}'s update was counted: its mask key is never revealed")


def rebuild_secrets(secure: SecAggRound) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """The survivors' self-mask seeds and the mask keys of those that dropped after sharing
    (only where a mask of theirs is in the sum); SecAggError when one cannot be rebuilt."""
    seeds: dict[int, bytes] = {}
    keys: dict[int, bytes] = {}
    for u in sorted(secure.submitted):
        seeds[u] = rebuild(secure, u, "self_mask", matches_commitment(secure.clients[u].commitment))
    for u in sorted(secure.shared - secure.submitted):
        if secure.submitted & set(secure.graph[u]):  # else no mask of u's is in the sum
            keys[u] = rebuild(secure, u, "mask_key", matches_public_key(secure.clients[u].mask_key))
    return seeds, keys


def remove_masks(
    secure: SecAggRound,
    masked_sums: dict[int, list[np.ndarray]],
    seeds: dict[int, bytes],
    keys: dict[int, bytes],
) -> dict[int, list[np.ndarray]]:
    """Each group's true sum, by group index."""
    mask_keys = {u: secure.clients[u].mask_key for u in secure.submitted}
    out = {}
    for index, members in secure.groups_submitted().items():
        mine = secure.groups[index]
        out[index] = _remove_group_masks(
            secure,
            masked_sums[index],
            {u: b for u, b in seeds.items() if u in mine},
            {u: k for u, k in keys.items() if u in mine},
            {u: k for u, k in mask_keys.items() if u in members},
        )
    return out


def _remove_group_masks(
    secure: SecAggRound,
    masked_sum: Sequence[np.ndarray],
    seeds: dict[int, bytes],
    keys: dict[int, bytes],
    mask_keys: dict[int, bytes],
) -> list[np.ndarray]:
    flat = sa.flatten(masked_sum)
    for seed in seeds.values():
        sa.apply_mask(flat, seed, -1)
    for u, key in keys.items():  # u dropped after sharing: remove what its neighbours added for it
        private = sa.private_key(key)
        for v in secure.graph[u]:
            if v in mask_keys:
                pair = sa.agree(
                    private,
                    mask_keys[v],
                    sa.context(secure.run_id, secure.number, secure.session, "mask", *sorted((u, v))),
                )
                sa.apply_mask(flat, pair, -sa.pairwise_sign(v, u))
    return sa.unflatten(flat, masked_sum)


def rebuild(secure: SecAggRound, owner: int, kind: str, valid: Callable[[bytes], bool]) -> bytes:
    """`owner`'s secret from the revealed shares: the first `threshold` of them that agree with
    its commitment (or public key). Revealers outside that set whose shares do not fit are
    named; too few shares, or none that agree, abort. Too few is nobody's proven fault: a
    holder that revealed without this share and the owner are recorded as a dispute."""
    # The owner's own share first, then by revealer: the same order whatever the arrival order.
    shares = sorted(
        ((revealer, share) for revealer, k, share in secure.clients[owner].reveals if k == kind),
        key=lambda pair: (pair[0] != owner, pair[0]),
    )
    needed = secure.thresholds[owner]
    what = f"client {owner}'s {kind.replace('_', ' ')}"
    if len(shares) < needed:
        # Holders that revealed, but not this share: a share that did not decrypt (the owner's
        # doing) or one held back (the holder's). Counting them as if they had revealed it
        # would let one holder get an honest owner excluded.
        silent = sorted((set(secure.graph[owner]) & secure.revealed) - {r for r, _ in shares})
        secure.disputes.update(frozenset((owner, h)) for h in silent)
        held_back = (
            f"; client(s) {silent} revealed their shares but none of {what} (one that did not "
            f"decrypt, or held back): they and client {owner} will not be neighbours again"
            if silent
            else ""
        )
        raise SecAggError(
            f"{len(shares)} shares of {what} arrived and {needed} are needed: too few clients survived"
            + held_back
        )
    for attempt, subset in enumerate(_subsets(shares, needed, f"{secure.session.hex()}|{owner}|{kind}")):
        secret = _combine([s for _, s in subset])
        if secret is None or not valid(secret):
            continue
        if attempt:
            base = [s for _, s in subset[:-1]]
            liars = sorted(
                r for r, s in shares if (r, s) not in subset and not valid(_combine([*base, s]) or b"")
            )
            secure.suspects.update(liars)
            log.warning(
                "round %d: the shares of %s revealed by client(s) %s do not fit the others; left out",
                secure.number, what, liars,
            )  # fmt: skip
        return secret
    secure.culprits.add(owner)
    raise SecAggError(
        f"no {needed} of the {len(shares)} shares of {what} rebuild it: client {owner} sent "
        "inconsistent shares, or too many revealers lied"
    )


def _subsets(shares: list[T], size: int, seed: str) -> Iterator[tuple[T, ...]]:
    """The first `size` shares, then up to MAX_REBUILD_ATTEMPTS - 1 seeded random choices: with e
    bad shares among h, a random choice avoids them all with chance C(h-e, size)/C(h, size)
    (7/15 for one bad share among 15 at size 8), where trying the combinations in order could
    spend every attempt on ones that all hold the same early bad share."""
    yield tuple(shares[:size])
    if len(shares) == size:
        return
    rng = random.Random(seed)
    for _ in range(MAX_REBUILD_ATTEMPTS - 1):
        yield tuple(rng.sample(shares, size))


def _combine(shares: Sequence[sa.Share]) -> bytes | None:
    try:
        return sa.combine(shares)
    except (SecAggError, ValueError):
        return None


def matches_commitment(commitment: bytes) -> Callable[[bytes], bool]:
    return lambda seed: sa.commitment(seed) == commitment


def matches_public_key(public: bytes) -> Callable[[bytes], bool]:
    def valid(private: bytes) -> bool:
        try:
            return sa.public_of(private) == public
        except SecAggError:
            return False

    return valid
