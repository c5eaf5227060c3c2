import numpy as np
import pytest
from fedgrpc.common.errors import ConfigError
from fedgrpc.common.partition import shard_indices


def test_reference_split_sizes() -> None:
    shards = [shard_indices(50_000, 3, k, seed=42) for k in range(3)]
    assert [len(s) for s in shards] == [16_666] * 3  # remainder of 2 left out


def test_shards_are_disjoint_and_cover_all_but_the_remainder() -> None:
    n, parts = 1003, 7
    shards = [shard_indices(n, parts, k, seed=3) for k in range(parts)]
    joined = np.concatenate(shards)
    assert len(np.unique(joined)) == len(joined) == (n // parts) * parts


def test_shards_are_a_pure_function_of_seed_shard_and_count() -> None:
    np.testing.assert_array_equal(shard_indices(500, 3, 1, seed=9), shard_indices(500, 3, 1, seed=9))
    assert not np.array_equal(shard_indices(500, 3, 1, seed=9), shard_indices(500, 3, 1, seed=10))


def test_shards_are_shuffled_not_class_blocks() -> None:
    labels = np.repeat(np.arange(10), 100)  # grouped by class, like the JPEG archive
    for k in range(3):
        assert len(np.unique(labels[shard_indices(1000, 3, k, seed=42)])) == 10


@pytest.mark.parametrize(("n", "parts", "shard"), [(10, 0, 0), (10, 3, 3), (10, 3, -1), (2, 3, 0)])
def test_impossible_splits_are_refused(n: int, parts: int, shard: int) -> None:
    with pytest.raises(ConfigError):
        shard_indices(n, parts, shard, seed=0)
