from collections.abc import Callable

import numpy as np
import pytest
from fedgrpc.common.errors import ConfigError
from fedgrpc.server.aggregate import WeightedSum, sum_dtype, weighted_change, weighted_mean
from fedgrpc.server.strategy import FedAvg, StrategySettings, add_update, make_strategy


def test_weighted_mean_matches_a_hand_computed_example() -> None:
    a = [np.array([1.0, 2.0], np.float32), np.array([[0.0]], np.float32)]
    b = [np.array([4.0, 8.0], np.float32), np.array([[3.0]], np.float32)]
    # weights 1 and 2: (1*1 + 2*4)/3 = 3, (1*2 + 2*8)/3 = 6, (0 + 2*3)/3 = 2
    out = weighted_mean([(a, 1), (b, 2)])
    np.testing.assert_array_equal(out[0], [3.0, 6.0])
    np.testing.assert_array_equal(out[1], [[2.0]])
    assert out[0].dtype == np.float32


def test_equal_counts_give_the_plain_mean() -> None:
    rng = np.random.default_rng(0)
    updates = [[rng.standard_normal((5, 5)).astype(np.float32)] for _ in range(3)]
    out = weighted_mean([(u, 16666) for u in updates])
    np.testing.assert_allclose(out[0], np.mean([u[0] for u in updates], axis=0), atol=1e-6)


def test_float64_accumulation_keeps_float32_exact_to_1e6() -> None:
    rng = np.random.default_rng(1)
    updates = [
        ([rng.standard_normal(10_000).astype(np.float32) * 10], int(n)) for n in rng.integers(1, 50_000, 20)
    ]
    expected = sum(w[0].astype(np.float64) * n for w, n in updates) / sum(n for _, n in updates)
    out = weighted_mean(updates)[0]
    assert np.max(np.abs(out.astype(np.float64) - expected)) <= 1e-6


def test_running_sum_equals_batch_mean_in_any_order() -> None:
    rng = np.random.default_rng(2)
    reference = [rng.standard_normal((3, 4)).astype(np.float32)]
    updates = [
        ([rng.standard_normal((3, 4)).astype(np.float32)], int(rng.integers(1, 100))) for _ in range(7)
    ]
    total = WeightedSum(reference)
    for weights, n in reversed(updates):
        total.add(weights, n)
    np.testing.assert_allclose(total.mean()[0], weighted_mean(updates)[0], atol=1e-6)
    assert total.count == 7


def _training_like_round(
    seed: int, clients: int, size: int, change: float
) -> tuple[list[np.ndarray], list[tuple[list[np.ndarray], int]]]:
    rng = np.random.default_rng(seed)
    reference = [(rng.standard_normal(size) * 0.05).astype(np.float32)]
    updates = [
        ([(reference[0] + rng.standard_normal(size) * change).astype(np.float32)], int(n))
        for n in rng.integers(1, 50_000, clients)
    ]
    return reference, updates


def test_the_float32_centred_sum_matches_the_float64_mean_to_1e_minus_6() -> None:
    # Changes as big as the weights themselves (the worst case for a sum of changes).
    reference, updates = _training_like_round(seed=6, clients=50, size=20_000, change=0.05)
    total = WeightedSum(reference)
    for weights, n in updates:
        total.add_change([weighted_change(weights[0], reference[0], n)], n)
    error = np.abs(total.take_mean()[0].astype(np.float64) - weighted_mean(updates)[0].astype(np.float64))
    assert error.max() <= 1e-6


def test_small_changes_lose_nothing_a_float32_result_could_show() -> None:
    # Changes a hundred times smaller than the weights, as in training: every value is within
    # one float32 step of the exact mean, plus a few float32 steps of the change near zero.
    change = 5e-4
    reference, updates = _training_like_round(seed=7, clients=50, size=20_000, change=change)
    total = WeightedSum(reference)
    for weights, n in updates:
        total.add(weights, n)
    exact = sum(w[0].astype(np.float64) * n for w, n in updates) / sum(n for _, n in updates)
    error = np.abs(total.take_mean()[0] - exact)
    assert np.all(error <= np.spacing(np.abs(exact).astype(np.float32)) + 4 * change * 2.0**-23)


def test_folding_weighted_changes_equals_folding_weights() -> None:
    size = WeightedSum.BLOCK * 2 + 3  # two full blocks and a remainder
    rng = np.random.default_rng(5)
    reference: list[np.ndarray] = [rng.standard_normal(size).astype(np.float32), rng.integers(0, 9, (4, 2))]
    updates: list[tuple[list[np.ndarray], int]] = [
        ([rng.standard_normal(size).astype(np.float32), rng.integers(0, 9, (4, 2))], n) for n in (1, 7, 250)
    ]
    blocked, prepared = WeightedSum(reference), WeightedSum(reference)
    for weights, n in updates:
        blocked.add(weights, n)
        prepared.add_change([weighted_change(w, g, n) for w, g in zip(weights, reference, strict=True)], n)
    for a, b in zip(blocked.take_mean(), prepared.take_mean(), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def test_weighted_change_overwrites_only_what_it_may() -> None:
    weights, reference = np.array([3.0, 5.0], np.float32), np.array([1.0, 1.0], np.float32)
    kept = weighted_change(weights, reference, 10)
    np.testing.assert_array_equal(kept, [20.0, 40.0])
    np.testing.assert_array_equal(weights, [3.0, 5.0])
    assert weighted_change(weights, reference, 10, in_place=True) is weights
    half = np.array([1.0], np.float16)
    assert weighted_change(half, half, 70_000, in_place=True).dtype == np.float32  # no float16 overflow
    assert sum_dtype(np.dtype(np.int64)) == np.float64


def test_a_change_of_the_wrong_dtype_is_refused() -> None:
    total = WeightedSum([np.zeros(2, np.float32)])
    with pytest.raises(ValueError, match="float64"):
        total.add_change([np.zeros(2, np.float64)], 1)


def test_integer_tensors_are_rounded_back() -> None:
    out = weighted_mean([([np.array([1], np.int64)], 1), ([np.array([2], np.int64)], 3)])
    assert out[0].dtype == np.int64 and out[0][0] == 2  # 1.75 rounds to 2


@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_counts_are_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        WeightedSum([np.zeros(2)]).add([np.zeros(2)], bad)


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="does not match"):
        WeightedSum([np.zeros(2)]).add([np.zeros(3)], 1)


def test_fedavg_strategy_averages_one_round_at_a_time() -> None:
    strategy, start = FedAvg(), [np.zeros(2, np.float32)]
    strategy.begin_round(start, 2)
    add_update(strategy, [np.array([2.0, 2.0], np.float32)], start, 1)
    add_update(strategy, [np.array([4.0, 8.0], np.float32)], start, 1)
    np.testing.assert_array_equal(strategy.result()[0], [3.0, 5.0])
    start = [np.ones(2, np.float32)]
    strategy.begin_round(start, 2)  # a new round forgets the last one
    add_update(strategy, [np.array([2.0, 3.0], np.float32)], start, 5)
    np.testing.assert_array_equal(strategy.result()[0], [2.0, 3.0])


def test_unknown_strategy_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="fedavg"):
        make_strategy(StrategySettings("mystery"))


def reference_median(updates: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Each coordinate's median, from its sorted values (the middle one, or the middle two's mean)."""
    result = []
    for i, template in enumerate(updates[0]):
        out = np.empty(template.shape, np.float64)
        for position in np.ndindex(template.shape):
            values = sorted(float(u[i][position]) for u in updates)
            middle = len(values) // 2
            out[position] = values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
        result.append(out)
    return result


def reference_trimmed_mean(updates: list[list[np.ndarray]], fraction: float) -> list[np.ndarray]:
    """Each coordinate's mean after int(fraction x n) values are cut from each end."""
    cut = int(fraction * len(updates))
    result = []
    for i, template in enumerate(updates[0]):
        out = np.empty(template.shape, np.float64)
        for position in np.ndindex(template.shape):
            kept = sorted(float(u[i][position]) for u in updates)[cut : len(updates) - cut]
            out[position] = sum(kept) / len(kept)
        result.append(out)
    return result


def reference_krum(updates: list[list[np.ndarray]], byzantine: int) -> list[np.ndarray]:
    """Krum: the update whose n - f - 2 nearest others are closest (summed squared distances)."""

    def distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
        return sum(
            float(((x.astype(np.float64) - y.astype(np.float64)) ** 2).sum())
            for x, y in zip(a, b, strict=True)
        )

    scores = []
    for k, update in enumerate(updates):
        others = sorted(distance(update, other) for j, other in enumerate(updates) if j != k)
        scores.append(sum(others[: len(updates) - byzantine - 2]))
    return updates[scores.index(min(scores))]


def robust_rounds() -> list[list[list[np.ndarray]]]:
    """Rounds of 4 to 9 updates of two tensors, some with outliers, one of them tied."""
    rng = np.random.default_rng(11)
    rounds = []
    for n in (4, 5, 6, 7, 9):
        updates = [
            [rng.normal(0, 1, (3, 2)).astype(np.float32), rng.normal(5, 1, 4).astype(np.float32)]
            for _ in range(n)
        ]
        for evil in updates[: n // 4]:
            evil[0] *= 1000
            evil[1][:] = -1e4
        rounds.append(updates)
    rounds.append([[np.full(2, v, np.float32)] for v in (1.0, 2.0, 2.0, 3.0, 500.0)])
    return rounds


def test_median_trimmed_mean_and_krum_equal_their_definitions() -> None:
    from fedgrpc.server.aggregate import coordinate_median, krum, trimmed_mean

    for updates in robust_rounds():
        for got, want in zip(coordinate_median(updates), reference_median(updates), strict=True):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=1e-6)
        for fraction in (0.0, 0.1, 0.2, 0.34, 0.49):
            for got, want in zip(
                trimmed_mean(updates, fraction), reference_trimmed_mean(updates, fraction), strict=True
            ):
                np.testing.assert_allclose(got, want, rtol=1e-6)
        for byzantine in range(len(updates) - 2):
            for got, want in zip(krum(updates, byzantine), reference_krum(updates, byzantine), strict=True):
                assert got.dtype == np.float32
                np.testing.assert_array_equal(got, want)
    updates = robust_rounds()[0]
    with pytest.raises(ValueError, match="more than f \\+ 2"):
        krum(updates[:3], num_byzantine=1)


def test_robust_strategies_by_name() -> None:
    """Through make_strategy, with the flags' defaults (trim 0.2, one Byzantine client)."""
    definitions: dict[str, Callable[[list[list[np.ndarray]]], list[np.ndarray]]] = {
        "median": reference_median,
        "trimmed-mean": lambda updates: reference_trimmed_mean(updates, 0.2),
        "krum": lambda updates: reference_krum(updates, 1),
    }
    for name, definition in definitions.items():
        for updates in robust_rounds():
            start = [np.zeros_like(t) for t in updates[0]]
            strategy = make_strategy(StrategySettings(name))
            strategy.begin_round(start, len(updates))
            for update in updates:
                add_update(strategy, update, start, 1)
            for got, want in zip(strategy.result(), definition(updates), strict=True):
                np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
    with pytest.raises(ConfigError, match="trim-fraction"):
        make_strategy(StrategySettings("trimmed-mean", trim_fraction=0.6))


def test_take_mean_equals_mean_and_empties_the_sum() -> None:
    rng = np.random.default_rng(4)
    reference: list[np.ndarray] = [rng.standard_normal((300, 7)).astype(np.float32), rng.integers(0, 9, 5)]
    updates: list[tuple[list[np.ndarray], int]] = [
        ([rng.standard_normal((300, 7)).astype(np.float32), rng.integers(0, 9, 5)], n) for n in (3, 11)
    ]
    kept, taken = WeightedSum(reference), WeightedSum(reference)
    for weights, n in updates:
        kept.add(weights, n)
        taken.add(weights, n)
    for a, b, want in zip(kept.mean(), taken.take_mean(), weighted_mean(updates), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, want, atol=1e-6)
        assert a.dtype == b.dtype == want.dtype
    with pytest.raises(ValueError, match="no updates"):
        taken.take_mean()
