"""The round state machine on its own: no network, no TensorFlow."""

import threading
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
from fedgrpc.common.codec import TensorSpec
from fedgrpc.common.config import RunSpec
from fedgrpc.common.errors import (
    ConfigError,
    NotEnrolledError,
    RunFailedError,
    StaleRoundError,
    UpdateRejectedError,
)
from fedgrpc.common.protocol import Instruction
from fedgrpc.server.rounds import RoundCoordinator, UpdateHeader
from fedgrpc.server.strategy import FedAvg

SPECS = [TensorSpec("w", "float32", (2,)), TensorSpec("b", "float32", ())]


def weights(value: float) -> list[np.ndarray]:
    return [np.full(2, value, np.float32), np.array(value, np.float32)]


@pytest.fixture
def coordinator() -> RoundCoordinator:
    c = RoundCoordinator(RunSpec(rounds=2, num_clients=2), SPECS, FedAvg(), max_examples=1000)
    for client in (1, 2):  # both clients are ready before the first round opens, as the server waits for
        assert c.next_task(client, after_round=0, timeout=0).instruction is Instruction.WAIT
    assert c.wait_ready(2, timeout=0)
    c.open_round(1, weights(0.0))
    return c


def submit(
    c: RoundCoordinator, client: int, value: float, n: int = 10, round_number: int = 1
) -> tuple[int, int]:
    c.admit(UpdateHeader(client, round_number, n, SPECS))
    return c.submit(client, round_number, n, {"loss": 1.0}, weights(value), wire_bytes=16)


def test_a_round_closes_with_the_weighted_mean(coordinator: RoundCoordinator) -> None:
    assert submit(coordinator, 1, 1.0, n=10) == (1, 2)
    assert not coordinator.wait_for_updates(2, timeout=0)
    assert submit(coordinator, 2, 4.0, n=20) == (2, 2)
    assert coordinator.wait_for_updates(2, timeout=0)
    outcome = coordinator.close_round()
    np.testing.assert_allclose(outcome.weights[0], [3.0, 3.0])
    assert [u.client_id for u in outcome.updates] == [1, 2]
    assert outcome.bytes_in == 32


def test_train_task_carries_the_round_weights(coordinator: RoundCoordinator) -> None:
    task = coordinator.next_task(1, after_round=0, timeout=0)
    assert task.instruction is Instruction.TRAIN and task.round == 1
    assert not task.weights[0].flags.writeable  # shared between handler threads: read-only
    submit(coordinator, 1, 1.0)
    assert coordinator.next_task(1, after_round=1, timeout=0).instruction is Instruction.WAIT


def test_long_poll_wakes_when_the_next_round_opens(coordinator: RoundCoordinator) -> None:
    submit(coordinator, 1, 1.0)
    results = []
    waiter = threading.Thread(
        target=lambda: results.append(coordinator.next_task(1, after_round=1, timeout=10))
    )
    waiter.start()
    submit(coordinator, 2, 1.0)
    coordinator.close_round()
    coordinator.open_round(2, weights(1.0))
    waiter.join(timeout=5)
    assert results and results[0].instruction is Instruction.TRAIN and results[0].round == 2


def test_finish_tells_waiting_clients(coordinator: RoundCoordinator) -> None:
    coordinator.finish()
    assert coordinator.next_task(2, after_round=1, timeout=0).instruction is Instruction.FINISHED
    assert coordinator.wait_told_finished([2], timeout=0)
    assert not coordinator.wait_told_finished([1, 2], timeout=0)


def test_duplicate_updates_count_once(coordinator: RoundCoordinator) -> None:
    submit(coordinator, 1, 1.0)
    with pytest.raises(UpdateRejectedError, match="already submitted") as info:
        submit(coordinator, 1, 100.0)
    assert info.value.code == "ALREADY_EXISTS"
    submit(coordinator, 2, 3.0)
    np.testing.assert_allclose(coordinator.close_round().weights[0], [2.0, 2.0])


@pytest.mark.parametrize(
    ("client", "round_number", "n", "specs", "error", "message"),
    [
        (3, 1, 10, SPECS, NotEnrolledError, "ids are 1..2"),
        (0, 1, 10, SPECS, NotEnrolledError, "not part of this run"),
        (1, 2, 10, SPECS, StaleRoundError, "round 2 is not open"),
        (1, 0, 10, SPECS, StaleRoundError, "open round: 1"),
        (1, 1, 0, SPECS, UpdateRejectedError, "must be positive"),
        (1, 1, 10**9, SPECS, UpdateRejectedError, "limit of 1000"),
        (1, 1, 10, SPECS[:1], UpdateRejectedError, "has 1 tensors"),
        (1, 1, 10, [TensorSpec("w", "float64", (2,)), SPECS[1]], UpdateRejectedError, "expected 'w' float32"),
        (1, 1, 10, [TensorSpec("w", "float32", (3,)), SPECS[1]], UpdateRejectedError, r"float32\[3\]"),
        (1, 1, 10, [TensorSpec("x", "float32", (2,)), SPECS[1]], UpdateRejectedError, "'x'"),
    ],
)
def test_bad_headers_are_refused_before_any_bytes(
    coordinator: RoundCoordinator,
    client: int,
    round_number: int,
    n: int,
    specs: list[TensorSpec],
    error: type,
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        coordinator.admit(UpdateHeader(client, round_number, n, specs))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_updates_never_reach_the_aggregate(coordinator: RoundCoordinator, bad: float) -> None:
    poisoned = weights(1.0)
    poisoned[0][1] = bad
    with pytest.raises(UpdateRejectedError, match="NaN or infinite"):
        coordinator.submit(1, 1, 10, {}, poisoned, wire_bytes=0)
    submit(coordinator, 1, 1.0)
    submit(coordinator, 2, 1.0)
    outcome = coordinator.close_round()
    np.testing.assert_array_equal(outcome.weights[0], [1.0, 1.0])
    assert len(outcome.updates) == 2


def test_updates_after_the_round_closed_are_stale(coordinator: RoundCoordinator) -> None:
    submit(coordinator, 1, 1.0)
    coordinator.close_round()
    with pytest.raises(StaleRoundError, match="aggregating"):
        coordinator.admit(UpdateHeader(2, 1, 10, SPECS))
    with pytest.raises(UpdateRejectedError, match="already submitted") as info:  # a retry of a counted one
        coordinator.admit(UpdateHeader(1, 1, 10, SPECS))
    assert info.value.code == "ALREADY_EXISTS"


def test_a_late_joiner_sits_out_the_open_round() -> None:
    coordinator = RoundCoordinator(RunSpec(rounds=2, num_clients=2), SPECS, FedAvg())
    coordinator.next_task(1, after_round=0, timeout=0)
    coordinator.open_round(1, weights(0.0))
    # client 2 appears for the first time (after_round=0) while round 1 is open
    assert coordinator.next_task(2, after_round=0, timeout=0).instruction is Instruction.WAIT
    with pytest.raises(StaleRoundError, match="takes part from the next round"):
        coordinator.admit(UpdateHeader(2, 1, 10, SPECS))
    submit(coordinator, 1, 1.0)
    coordinator.close_round()
    coordinator.open_round(2, weights(1.0))
    task = coordinator.next_task(2, after_round=0, timeout=0)
    assert task.instruction is Instruction.TRAIN and task.round == 2


def test_a_returning_client_gets_the_open_round_again(coordinator: RoundCoordinator) -> None:
    # After a server restart the open round is 1 again, and a client that finished round 1
    # with the previous server (after_round=1) must train it again: its update was lost.
    task = coordinator.next_task(1, after_round=1, timeout=0)
    assert task.instruction is Instruction.TRAIN and task.round == 1
    submit(coordinator, 1, 1.0)
    assert coordinator.next_task(1, after_round=1, timeout=0).instruction is Instruction.WAIT


def test_interrupt_releases_the_driver(coordinator: RoundCoordinator) -> None:
    threading.Timer(0.1, coordinator.interrupt).start()
    assert not coordinator.wait_for_updates(2, timeout=10)
    assert coordinator.interrupted


def sampled(k: int, seed: int = 0) -> RoundCoordinator:
    c = RoundCoordinator(
        RunSpec(rounds=3, num_clients=6), SPECS, FedAvg(), clients_per_round=k, sample_seed=seed
    )
    for client in range(1, 7):
        c.next_task(client, after_round=0, timeout=0)
    return c


def trainers(c: RoundCoordinator) -> set[int]:
    return {
        i for i in range(1, 7) if c.next_task(i, after_round=0, timeout=0).instruction is Instruction.TRAIN
    }


def test_a_sampled_round_trains_k_clients_and_closes_on_their_updates() -> None:
    c = sampled(2)
    c.open_round(1, weights(0.0))
    chosen = trainers(c)
    assert len(chosen) == 2 and c.expected == 2
    left_out = min(set(range(1, 7)) - chosen)
    with pytest.raises(StaleRoundError, match="not sampled"):
        c.admit(UpdateHeader(left_out, 1, 10, SPECS))
    for client in sorted(chosen):
        received, expected = submit(c, client, 1.0)
    assert (received, expected) == (2, 2)
    assert c.wait_for_updates(c.expected, timeout=0)
    assert [u.client_id for u in c.close_round().updates] == sorted(chosen)


def test_samples_are_seeded_by_seed_and_round() -> None:
    draws = []
    for seed in (0, 0, 1):
        c = sampled(3, seed)
        rounds = []
        for number in (1, 2):
            c.open_round(number, weights(0.0))
            rounds.append(trainers(c))
            for client in rounds[-1]:
                submit(c, client, 1.0, round_number=number)
            c.close_round()
        draws.append(rounds)
    assert draws[0] == draws[1]  # same seed: same clients, e.g. after a server restart
    assert draws[0] != draws[2] and draws[0][0] != draws[0][1]


def test_clients_per_round_must_fit_the_run() -> None:
    with pytest.raises(ConfigError, match="1..6"):
        RoundCoordinator(RunSpec(num_clients=6), SPECS, FedAvg(), clients_per_round=7)


def three(min_clients: int = 1) -> RoundCoordinator:
    c = RoundCoordinator(RunSpec(rounds=2, num_clients=3), SPECS, FedAvg(), min_clients=min_clients)
    for client in (1, 2, 3):
        c.next_task(client, after_round=0, timeout=0)
    c.open_round(1, weights(0.0))
    return c


def test_an_update_sent_before_a_withdrawal_does_not_stand_in_for_another_client() -> None:
    c = three()
    submit(c, 1, 1.0)
    c.withdraw(1, "it ran out of disk")
    submit(c, 2, 1.0)
    assert not c.wait_for_everyone(timeout=0)  # client 3 is still expected
    assert not c.wait_for_updates(3, timeout=0)
    submit(c, 3, 1.0)
    assert c.wait_for_everyone(timeout=0)
    assert [u.client_id for u in c.close_round().updates] == [1, 2, 3]  # the early update is aggregated


def test_a_sampled_round_closes_once_the_rest_of_its_sample_has_reported() -> None:
    c = sampled(2)
    c.open_round(1, weights(0.0))
    stays, leaves = sorted(trainers(c))
    c.withdraw(leaves, "its data does not fit the model")
    submit(c, stays, 1.0)
    assert c.wait_for_updates(2, timeout=0)  # the server's wait for its floor: no more will come


def test_withdrawals_that_leave_fewer_than_min_clients_end_every_wait_with_a_clear_error() -> None:
    c = three(min_clients=2)
    c.withdraw(1, "its data does not fit the model")
    assert not c.wait_for_everyone(timeout=0)  # two are left: --min-clients 2 still holds
    errors: list[BaseException] = []

    def wait(waiter: Callable[[], bool]) -> None:
        try:
            waiter()
        except RunFailedError as exc:
            errors.append(exc)

    # None with a timeout: each must wake on the withdrawal (the first round's waits, a round's).
    waits = [c.wait_for_everyone, partial(c.wait_for_updates, 3), partial(c.wait_ready, 3)]
    threads = [threading.Thread(target=wait, args=(w,), daemon=True) for w in waits]
    for thread in threads:
        thread.start()
    c.withdraw(2, "the task's parameters are refused")
    for thread in threads:
        thread.join(timeout=30)
    assert len(errors) == len(waits)
    message = str(errors[0])
    assert "1 of 3 clients" in message and "--min-clients 2" in message
    assert "client 1: its data does not fit the model" in message and "client 2:" in message
    with pytest.raises(RunFailedError):
        c.wait_all_ready(timeout=0)
