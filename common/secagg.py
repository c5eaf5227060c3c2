"""Secure aggregation's building blocks, shared by server and clients: pure functions.

Practical Secure Aggregation (Bonawitz et al. 2017) with SecAgg+'s sparse neighbour graph
(Bell et al. 2020). Every client u of a round masks its update x_u before it leaves:

    y_u = x_u + PRG(b_u) + sum over neighbours v of (+PRG(s_uv) if u < v else -PRG(s_uv))   mod 2^32

b_u is u's own random seed; s_uv = HKDF(X25519(s_u, S_v)) is the secret u shares with v alone.
Summed over the clients that submitted, the pairwise masks cancel; the server removes the self
masks with b_u rebuilt from Shamir shares that u gave its neighbours, and, for a neighbour that
dropped after sharing, rebuilds its mask key from shares to remove the pairwise masks it left.

| piece        | what                                                                       |
|--------------|----------------------------------------------------------------------------|
| key pairs    | X25519 (cryptography): one for encrypting shares, one for pairwise masks   |
| keys         | HKDF-SHA256 of the X25519 agreement, bound to the run, round and purpose   |
| encryption   | AES-256-GCM of each share to its recipient, the pair and round as AAD       |
| masks (PRG)  | AES-256-CTR keystream as uint32 words                                       |
| shares       | Shamir over GF(2^128) (pycryptodome), a 32-byte secret as two 16-byte halves|
| commitments  | SHA-256 of b_u, advertised with u's keys: a rebuilt seed is checked        |
| encoding     | x_u = round(clip(delta, +-R) * n_u * scale) as int32 in the uint32 ring,   |
|              | plus n_u itself: the weights and the count travel masked                    |

The ring holds the sum exactly when |sum| < 2^31: `scale` is chosen from the round's size,
the largest example count and R so that it does (see `ring_scale`).
"""

from __future__ import annotations

import hashlib
import math
import random
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import SecAggError

#: The tensor a masked update lists after the model's: the masked example count.
COUNT_TENSOR = "secagg/num_examples"
RING_BITS = 32
_HALF = 1 << (RING_BITS - 1)
SEED_BYTES = 32
#: Up to this many clients a round, every client is every other's neighbour (Bonawitz et al.);
#: beyond, a Harary graph of degree `neighbour_degree(n)` (SecAgg+: O(log n) neighbours each).
FULL_GRAPH_UP_TO = 20


class Step(str, Enum):
    """A step a client long-polls for (GetSecAggStage): it may start once the server has moved
    past the stage before it."""

    SHARE = "share"  # the neighbours' public keys are known: share the secrets
    MASK = "mask"  # the shares addressed to the client and the scale are known: submit the update
    UNMASK = "unmask"  # the survivors are known: reveal the shares the server may have


class StageStatus(str, Enum):
    """What a GetSecAggStage answer says of the step asked for."""

    WAIT = "wait"  # not yet: ask again
    READY = "ready"  # the step may start: the Stage's fields for it are set
    ABORTED = "aborted"  # this attempt at the round is over (`reason`)


class ShareKind(str, Enum):
    """Whose secret a revealed share rebuilds: a survivor's self-mask seed or a dropped client's mask key."""

    SELF_MASK = "self_mask"
    MASK_KEY = "mask_key"


@dataclass(frozen=True)
class Stage:
    """A GetSecAggStage answer, the same on both sides (fields set for the step asked)."""

    status: StageStatus
    session: bytes = b""
    reason: str = ""
    neighbours: tuple[tuple[int, bytes, bytes], ...] = ()  # (id, cipher public key, mask public key)
    threshold: int = 0
    scale: float = 0.0
    shares: tuple[tuple[int, bytes], ...] = ()  # (owner, ciphertext)
    masking: tuple[int, ...] = ()
    survivors: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()


# -- keys, agreement, encryption --------------------------------------------------------------


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def check_public_key(raw: bytes) -> None:
    """Refuse bytes that are no X25519 key, or a key of low order, with which every exchange
    fails (all-zero result): a client advertising one would make its neighbours' steps fail."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError as exc:
        raise SecAggError(f"not a usable X25519 public key: {exc}") from None


def public_of(private_raw: bytes) -> bytes:
    """The public key of a raw private key (to check a rebuilt one against what was advertised)."""
    return public_bytes(private_key(private_raw))


def private_key(raw: bytes) -> X25519PrivateKey:
    try:
        return X25519PrivateKey.from_private_bytes(raw)
    except ValueError as exc:
        raise SecAggError(f"not an X25519 private key: {exc}") from None


def agree(private: X25519PrivateKey, peer_public: bytes, context: bytes) -> bytes:
    """32 bytes only the two key holders can compute, bound to `context` (run, round, purpose)."""
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
        shared = private.exchange(peer)
    except ValueError as exc:
        raise SecAggError(f"bad public key: {exc}") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedgrpc-secagg|" + context).derive(
        shared
    )


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(ciphertext[:12], ciphertext[12:], associated)
    except Exception as exc:  # InvalidTag, or a ciphertext too short to hold a nonce
        raise SecAggError(f"a share that does not decrypt ({type(exc).__name__})") from None


def context(run_id: str, round_number: int, session: bytes, purpose: str, *parties: int) -> bytes:
    """What a derived key is bound to: the run, the round, this attempt at it, the purpose and
    the two parties (smaller id first), so no key serves twice."""
    return "|".join([run_id, str(round_number), session.hex(), purpose, *map(str, parties)]).encode()


def share_aad(owner: int, recipient: int, round_number: int) -> bytes:
    """The associated data of a share's encryption: a ciphertext moved to another pair or
    round does not decrypt."""
    return f"{owner}>{recipient}@{round_number}".encode()


# -- masks --------------------------------------------------------------------------------------


def prg(seed: bytes, count: int) -> np.ndarray:
    """`count` uint32 words expanded from a 32-byte seed (AES-256-CTR keystream)."""
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"a mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    stream = encryptor.update(bytes(4 * count)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


def commitment(seed: bytes) -> bytes:
    return hashlib.sha256(b"fedgrpc-secagg-self-mask|" + seed).digest()


def pairwise_sign(me: int, other: int) -> int:
    """+1 if `me` adds the mask it shares with `other`, -1 if it subtracts it: they cancel."""
    return 1 if me < other else -1


def apply_mask(words: np.ndarray, seed: bytes, sign: int) -> None:
    """words += sign * PRG(seed), in place, modulo 2^32."""
    mask = prg(seed, words.size)
    if sign > 0:
        np.add(words, mask, out=words)
    else:
        np.subtract(words, mask, out=words)


def flatten(tensors: Sequence[np.ndarray]) -> np.ndarray:
    """One uint32 vector of every tensor's words in order: what the masks cover."""
    return (
        np.concatenate([np.asarray(t, np.uint32).ravel() for t in tensors])
        if tensors
        else np.zeros(0, np.uint32)
    )


def unflatten(flat: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    sizes = [int(np.size(t)) for t in like]
    pieces = np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []
    return [p.reshape(np.shape(t)) for p, t in zip(pieces, like, strict=True)]


# -- Shamir --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Share:
    index: int  # 1..n: the point the polynomial was evaluated at
    value: bytes  # 32 bytes: the two 16-byte halves' shares


def split(secret: bytes, threshold: int, count: int) -> list[Share]:
    """`count` shares of a 32-byte secret, any `threshold` of which rebuild it."""
    from Crypto.Protocol.SecretSharing import Shamir

    if len(secret) != 32:
        raise SecAggError(f"secrets shared are 32 bytes, got {len(secret)}")
    if not 2 <= threshold <= count:
        raise SecAggError(f"a threshold of {threshold} cannot work with {count} shares")
    halves = [Shamir.split(threshold, count, secret[:16]), Shamir.split(threshold, count, secret[16:])]
    return [Share(a[0], a[1] + b[1]) for a, b in zip(*halves, strict=True)]


def combine(shares: Sequence[Share]) -> bytes:
    """The secret from at least threshold shares (with wrong or too few shares: a wrong secret)."""
    from Crypto.Protocol.SecretSharing import Shamir

    if len({s.index for s in shares}) != len(shares):
        raise SecAggError("two shares with the same index")
    first = Shamir.combine([(s.index, s.value[:16]) for s in shares])
    second = Shamir.combine([(s.index, s.value[16:]) for s in shares])
    return bytes(first) + bytes(second)


def encode_shares(owner: int, self_mask: Share, mask_key: Share) -> bytes:
    """The plaintext a client encrypts for a neighbour: whose shares, at which index, of its
    self-mask seed b_u and of its mask key s_u (both shares at the same index)."""
    if self_mask.index != mask_key.index:
        raise SecAggError("the two shares for one neighbour must have one index")
    return owner.to_bytes(4, "big") + self_mask.index.to_bytes(2, "big") + self_mask.value + mask_key.value


def decode_shares(plaintext: bytes) -> tuple[int, Share, Share]:
    """(owner, share of its self-mask seed, share of its mask key)."""
    if len(plaintext) != 4 + 2 + 32 + 32:
        raise SecAggError(f"a decrypted share holds {len(plaintext)} bytes, not 70")
    owner, index = int.from_bytes(plaintext[:4], "big"), int.from_bytes(plaintext[4:6], "big")
    return owner, Share(index, plaintext[6:38]), Share(index, plaintext[38:70])


# -- the neighbour graph ------------------------------------------------------------------------------


def neighbour_degree(n: int) -> int:
    """SecAgg+'s degree: about 2 log2(n), even, at most n - 1 (then the graph is complete)."""
    if n <= FULL_GRAPH_UP_TO:
        return n - 1
    return min(n - 1, 2 * math.ceil(math.log2(n)))


def neighbours(clients: Iterable[int], seed: str) -> dict[int, list[int]]:
    """Each client's neighbours: all others for small rounds, else a Harary graph of even degree
    k on a seeded cyclic order (each client joined to the k/2 before and after it)."""
    ordered = sorted(clients)
    n = len(ordered)
    degree = neighbour_degree(n)
    if degree >= n - 1:
        return {u: [v for v in ordered if v != u] for u in ordered}
    ring = list(ordered)
    random.Random(seed).shuffle(ring)
    half = degree // 2
    graph: dict[int, set[int]] = {u: set() for u in ordered}
    for position, u in enumerate(ring):
        for step in range(1, half + 1):
            v = ring[(position + step) % n]
            graph[u].add(v)
            graph[v].add(u)
    return {u: sorted(vs) for u, vs in graph.items()}


def threshold(holders: int, fraction: float) -> int:
    """Shares needed to rebuild a secret split among `holders` (a client's neighbours and
    itself): the smallest count above fraction * holders, at least 2. Above half (fraction
    0.5, the default) no two disjoint groups of holders can both rebuild it."""
    return max(2, min(holders, math.floor(fraction * holders) + 1))


# -- encoding updates in the ring ----------------------------------------------------------------


def ring_scale(clients: int, max_examples: int, bound: float) -> float:
    """The largest scale at which the sum of `clients` updates, each coordinate at most
    max_examples * bound, stays below 2^31 in magnitude (so the ring's sum is the true one)."""
    if clients * max_examples >= _HALF:
        raise SecAggError(
            f"{clients} clients of up to {max_examples} examples overflow the 32-bit ring's count; "
            "lower --secagg-max-examples"
        )
    # Headroom for rounding: each encoded value is at most n * bound * scale + 1/2, so k of
    # them stay below (2^31 - 1 - k) + k/2 < 2^31.
    scale = (_HALF - 1 - clients) / (clients * max_examples * bound)
    if scale < 1:
        raise SecAggError(
            f"{clients} clients x {max_examples} examples x bound {bound} leave the ring no precision; "
            "lower --secagg-max-examples or --secagg-bound"
        )
    return scale


def encode(changes: Sequence[np.ndarray], num_examples: int, scale: float, bound: float) -> list[np.ndarray]:
    """x_u: each change clipped to +-bound, times num_examples and scale, rounded, in the ring;
    then the example count itself as one more word."""
    out = []
    for change in changes:
        clipped = np.clip(np.asarray(change, np.float64), -bound, bound) * (num_examples * scale)
        out.append(np.rint(clipped).astype(np.int64).astype(np.uint32))
    out.append(np.array([num_examples], dtype=np.uint32))
    return out


def decode(total: Sequence[np.ndarray], scale: float) -> tuple[list[np.ndarray], int]:
    """The unmasked ring sum back to (sum of num_examples * change, sum of num_examples)."""
    *values, count = total
    sums = [np.asarray(v).astype(np.uint32).view(np.int32).astype(np.float64) / scale for v in values]
    return sums, int(np.asarray(count).astype(np.uint32).view(np.int32)[0])
