"""Cut one dataset into client shards: stand-in federations for demos, benchmarks and studies.

Every client computes its own shard from the run spec alone (scheme, seed, number of
clients) and the dataset's labels, so no index list ever travels, the shards of one run are
disjoint (every example is used at most once), and every client of a run agrees.

| scheme           | what each client gets                                                 |
|------------------|-----------------------------------------------------------------------|
| `iid` (default)  | an equal contiguous cut of one seeded shuffle, the remainder left out |
|                  | (the reference job's split)                                          |
| `dirichlet:A`    | label skew (Hsu et al. 2019): each class is split between clients in  |
|                  | proportions drawn from Dirichlet(A); small A, few classes per client  |
| `classes:K`      | pathological skew (McMahan et al. 2017): the examples sorted by label |
|                  | are cut into clients x K equal pieces, K pieces to each client        |
| `quantity:A`     | size skew: IID content, sizes in proportions drawn from Dirichlet(A)  |

No client may be empty. The Dirichlet schemes draw again (a seeded sequence of draws) until
every client has at least `MIN_EXAMPLES` examples; if 100 draws all leave a client short, the
run cannot be cut that way and a ConfigError says so (raise A, or use fewer clients).
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

SCHEMES = ("iid", "dirichlet:ALPHA", "classes:K", "quantity:ALPHA")
MIN_EXAMPLES = 2
_DRAWS = 100


def check_scheme(scheme: str) -> tuple[str, float]:
    """(kind, parameter) of a scheme string; raises ConfigError naming the valid forms."""
    kind, _, value = scheme.partition(":")
    if kind == "iid" and not value:
        return kind, 0.0
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if kind in ("dirichlet", "quantity") and number > 0:
        return kind, number
    if kind == "classes" and number >= 1 and number == int(number):
        return kind, number
    raise ConfigError(
        f"unknown partition {scheme!r}; use iid, dirichlet:ALPHA or quantity:ALPHA (ALPHA > 0), "
        "or classes:K (K a whole number >= 1)"
    )


def shard_indices(num_examples: int, num_shards: int, shard: int, seed: int) -> np.ndarray:
    """Indices (into the unshuffled dataset) of IID shard `shard` of `num_shards`, 0-based."""
    _check_shard(num_shards, shard)
    size = num_examples // num_shards
    if size == 0:
        raise ConfigError(f"{num_examples} examples cannot be cut into {num_shards} non-empty shards")
    order = np.random.default_rng(seed).permutation(num_examples)
    return order[shard * size : (shard + 1) * size]


def partition_indices(
    labels: np.ndarray, num_shards: int, shard: int, seed: int, scheme: str = "iid"
) -> np.ndarray:
    """Indices of shard `shard` (0-based) of `num_shards` under `scheme`; `labels` are class ids."""
    kind, value = check_scheme(scheme)
    _check_shard(num_shards, shard)
    if kind == "iid":
        return shard_indices(len(labels), num_shards, shard, seed)
    return all_partitions(np.asarray(labels), num_shards, seed, scheme)[shard]


def all_partitions(labels: np.ndarray, num_shards: int, seed: int, scheme: str) -> list[np.ndarray]:
    """Every shard's indices, sorted, under `scheme` (what partition_indices picks one from)."""
    kind, value = check_scheme(scheme)
    n = len(labels)
    if kind == "iid":
        return [shard_indices(n, num_shards, k, seed) for k in range(num_shards)]
    if kind == "classes":
        return _by_classes(labels, num_shards, int(value), seed)
    for draw in range(_DRAWS):
        rng = np.random.default_rng([seed, draw])
        parts = (
            _dirichlet_labels(labels, num_shards, value, rng)
            if kind == "dirichlet"
            else _by_quantity(n, num_shards, value, rng)
        )
        if min(len(p) for p in parts) >= MIN_EXAMPLES:
            return [np.sort(p) for p in parts]
    raise ConfigError(
        f"partition {scheme!r} left a client with fewer than {MIN_EXAMPLES} of {n} examples in "
        f"{_DRAWS} seeded draws; raise ALPHA or use fewer than {num_shards} clients"
    )


def _dirichlet_labels(
    labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for client, piece in enumerate(np.split(members, cuts)):
            parts[client].append(piece)
    return [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]


def _by_quantity(n: int, clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    shares = rng.dirichlet(np.full(clients, alpha))
    cuts = (np.cumsum(shares)[:-1] * n).astype(np.int64)
    return list(np.split(order, cuts))


def _by_classes(labels: np.ndarray, clients: int, per_client: int, seed: int) -> list[np.ndarray]:
    pieces = clients * per_client
    if pieces > len(labels):
        raise ConfigError(
            f"classes:{per_client} needs {pieces} examples for {clients} clients, got {len(labels)}"
        )
    rng = np.random.default_rng(seed)
    # Shuffle first so that ties within a class are cut in a seeded order, then sort by label.
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    size = len(labels) // pieces
    chunks = [order[i * size : (i + 1) * size] for i in range(pieces)]
    dealt = rng.permutation(pieces)
    return [
        np.sort(np.concatenate([chunks[j] for j in dealt[c * per_client : (c + 1) * per_client]]))
        for c in range(clients)
    ]


def _check_shard(num_shards: int, shard: int) -> None:
    if num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise ConfigError(f"shard must be in 0..{num_shards - 1}, got {shard}")


def matching_indices(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_shards: int,
    shard: int,
    seed: int,
    scheme: str = "iid",
) -> np.ndarray:
    """Indices of the test examples of shard `shard` that match its training data: each class's
    test examples are cut between the shards in the proportions its training examples were,
    so that a client evaluates on data distributed like what it trained on (disjoint shards).
    Under `iid` that is an equal seeded cut of the test set, like the training set's."""
    _check_shard(num_shards, shard)
    if check_scheme(scheme)[0] == "iid":
        return shard_indices(len(test_labels), num_shards, shard, seed)
    parts = all_partitions(np.asarray(train_labels), num_shards, seed, scheme)
    rng = np.random.default_rng([seed, 1])
    picked = []
    for label in np.unique(test_labels):
        counts = np.array([np.count_nonzero(train_labels[p] == label) for p in parts], dtype=np.float64)
        members = rng.permutation(np.flatnonzero(test_labels == label))
        if counts.sum() == 0:
            continue
        cuts = (np.cumsum(counts / counts.sum())[:-1] * len(members)).astype(np.int64)
        picked.append(np.split(members, cuts)[shard])
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, np.int64)
