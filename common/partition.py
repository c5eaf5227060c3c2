"""Split one dataset into client shards the way the reference job does.

The examples are shuffled once with a fixed seed, then cut into equal contiguous
shards; the remainder (fewer than num_shards examples) is left out. Every client
computes its own shard from (seed, shard, num_shards) alone, so no index list ever
travels, and the shards of one run are disjoint and cover all but the remainder.
"""

from __future__ import annotations

import numpy as np
from fedgrpc.common.errors import ConfigError


def shard_indices(num_examples: int, num_shards: int, shard: int, seed: int) -> np.ndarray:
    """Indices (into the unshuffled dataset) of shard `shard` of `num_shards`, 0-based."""
    if num_shards < 1:
        raise ConfigError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise ConfigError(f"shard must be in 0..{num_shards - 1}, got {shard}")
    size = num_examples // num_shards
    if size == 0:
        raise ConfigError(f"{num_examples} examples cannot be cut into {num_shards} non-empty shards")
    order = np.random.default_rng(seed).permutation(num_examples)
    return order[shard * size : (shard + 1) * size]
