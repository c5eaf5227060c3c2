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


LABELS = np.repeat(np.arange(10), 300)  # 3000 examples, grouped by class


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.1", "dirichlet:10", "classes:2", "quantity:0.5"])
def test_every_scheme_cuts_disjoint_non_empty_seeded_shards(scheme: str) -> None:
    from fedgrpc.common.partition import MIN_EXAMPLES, all_partitions, partition_indices

    shards = all_partitions(LABELS, 10, seed=4, scheme=scheme)
    joined = np.concatenate(shards)
    assert len(np.unique(joined)) == len(joined)  # every example used at most once
    assert min(len(s) for s in shards) >= MIN_EXAMPLES
    for k, shard in enumerate(shards):  # what each client computes on its own is its part of that
        np.testing.assert_array_equal(np.sort(partition_indices(LABELS, 10, k, 4, scheme)), np.sort(shard))
    again = all_partitions(LABELS, 10, seed=4, scheme=scheme)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))


def test_label_skew_grows_as_alpha_shrinks_and_classes_k_gives_k_classes() -> None:
    from fedgrpc.common.partition import all_partitions

    def classes_per_client(scheme: str) -> float:
        shards = all_partitions(LABELS, 10, seed=1, scheme=scheme)
        # classes holding at least 5% of a client's examples
        return float(np.mean([np.sum(np.bincount(LABELS[s], minlength=10) >= 0.05 * len(s)) for s in shards]))

    assert classes_per_client("iid") == 10
    assert classes_per_client("dirichlet:100") > 9
    assert classes_per_client("dirichlet:0.1") < 4
    shards = all_partitions(LABELS, 10, seed=1, scheme="classes:2")
    assert all(len(np.unique(LABELS[s])) <= 2 for s in shards)  # pieces of 150 never straddle classes here


def test_quantity_skew_keeps_every_class_but_not_every_size() -> None:
    from fedgrpc.common.partition import all_partitions

    shards = all_partitions(LABELS, 5, seed=2, scheme="quantity:0.3")
    sizes = sorted(len(s) for s in shards)
    assert sizes[-1] > 4 * sizes[0]
    assert all(len(np.unique(LABELS[s])) == 10 for s in shards if len(s) >= 100)


def test_an_impossible_dirichlet_cut_says_what_to_do() -> None:
    from fedgrpc.common.partition import all_partitions

    with pytest.raises(ConfigError, match="raise ALPHA or use fewer than 40 clients"):
        all_partitions(np.repeat(np.arange(2), 20), 40, seed=0, scheme="dirichlet:0.01")


@pytest.mark.parametrize("scheme", ["dirichlet", "dirichlet:0", "classes:1.5", "uniform", "iid:2"])
def test_unknown_schemes_list_the_valid_forms(scheme: str) -> None:
    from fedgrpc.common.partition import check_scheme

    with pytest.raises(ConfigError, match="use iid, dirichlet:ALPHA or quantity:ALPHA"):
        check_scheme(scheme)


def test_test_examples_follow_each_clients_training_classes() -> None:
    from fedgrpc.common.partition import all_partitions, matching_indices

    test_labels = np.repeat(np.arange(10), 100)
    shards = all_partitions(LABELS, 5, seed=3, scheme="dirichlet:0.2")
    picked = [matching_indices(LABELS, test_labels, 5, k, 3, "dirichlet:0.2") for k in range(5)]
    joined = np.concatenate(picked)
    assert len(np.unique(joined)) == len(joined)
    for shard, test in zip(shards, picked, strict=True):
        train_share = np.bincount(LABELS[shard], minlength=10) / 300
        test_share = np.bincount(test_labels[test], minlength=10) / 100
        np.testing.assert_allclose(test_share, train_share, atol=0.02)
