"""Protocol rules beyond single calls: a client that withdraws, metrics and retries under secure
aggregation. Real fl-server / fl-client processes, or real gRPC to an in-process coordinator."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from conftest import make_synthetic
from fedgrpc.client.light import light_update
from fedgrpc.client.secagg import SecureRound
from fedgrpc.common import secagg as sa
from fedgrpc.common.codec import TensorSpec
from fedgrpc.common.errors import StaleRoundError, UpdateRejectedError
from fedgrpc.common.processes import free_port
from helpers import finish, finish_all, server_command, start, start_clients
from test_secagg import _GarbageWords, _LiveRound


def test_a_client_whose_data_does_not_fit_says_so_and_the_run_goes_on_without_it(
    tmp_path: Path, synthetic_npz: Path
) -> None:
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    misfit = tmp_path / "misfit.npz"  # 16 x 16 images for a model of 32 x 32 ones
    x, y = make_synthetic(300, seed=1, size=16)
    np.savez(misfit, x_train=x, y_train=y, x_test=x[:50], y_test=y[:50])
    # A join timeout far beyond the test's bounds: the run must not wait for the client that withdrew.
    flags = ("--min-clients", "2", "--join-timeout", "3600", "--finish-grace", "1")
    server = start(*server_command(port, synthetic_npz, out, rounds=1, clients=3, extra=flags), log=log)
    ((bad, bad_log),) = start_clients(port, misfit, tmp_path, ids=(1,))
    good = start_clients(port, synthetic_npz, tmp_path, ids=(2, 3))
    assert finish(bad, bad_log) != 0
    assert "does not fit the model" in bad_log.read_text()
    assert finish(server, log) == 0, log.read_text()
    for process, client_log in good:
        assert finish(process, client_log) == 0, client_log.read_text()
    text = log.read_text()
    said = [line for line in text.splitlines() if "client 1 cannot take part" in line]
    assert len(said) == 1 and "does not fit the model" in said[0], text
    history = json.loads((out / "history.json").read_text())
    assert [w["client_id"] for w in history["withdrawn"]] == [1]
    assert "does not fit the model" in history["withdrawn"][0]["reason"]
    assert sorted(c["client_id"] for c in history["rounds"][0]["clients"]) == [2, 3]


def test_a_withdrawal_that_leaves_fewer_than_min_clients_stops_the_server_with_a_clear_error(
    tmp_path: Path, synthetic_npz: Path
) -> None:
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    misfit = tmp_path / "misfit.npz"
    x, y = make_synthetic(300, seed=1, size=16)
    np.savez(misfit, x_train=x, y_train=y, x_test=x[:50], y_test=y[:50])
    # Without --min-clients every client is needed: once one withdraws, the run cannot go on.
    flags = ("--join-timeout", "3600", "--finish-grace", "1")
    server = start(*server_command(port, synthetic_npz, out, rounds=1, clients=3, extra=flags), log=log)
    ((bad, bad_log),) = start_clients(port, misfit, tmp_path, ids=(1,))
    assert finish(bad, bad_log) != 0
    assert finish(server, log) == 2, log.read_text()
    text = log.read_text()
    assert "fl-server: error: only 2 of 3 clients can still take part, fewer than --min-clients 3" in text
    assert "client 1: " in text and "does not fit the model" in text and "lower --min-clients" in text


def test_a_round_whose_whole_sample_withdraws_is_sampled_again(tmp_path: Path, synthetic_npz: Path) -> None:
    from fedgrpc.client.connection import Connection
    from fedgrpc.common.protocol import Instruction

    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    # One client a round; with --sample-seed 0 round 1 samples client 1, which withdraws once it
    # has the weights (as a script whose model does not fit them does).
    flags: tuple[str, ...] = ("--clients-per-round", "1", "--min-clients", "1", "--join-timeout", "3600")
    flags += ("--finish-grace", "1")
    server = start(*server_command(port, synthetic_npz, out, rounds=1, clients=2, extra=flags), log=log)
    good = start_clients(port, synthetic_npz, tmp_path, ids=(2,))
    with Connection(f"127.0.0.1:{port}", 1, connect_timeout_s=180) as one:
        one.join()
        task = one.next_task(after_round=0, max_wait_s=10)
        for _ in range(60):
            if task.instruction is Instruction.TRAIN:
                break
            task = one.next_task(after_round=0, max_wait_s=10)
        assert task.instruction is Instruction.TRAIN and task.round == 1
        assert one.withdraw("the server's weights do not fit this script's model")
    assert finish(server, log) == 0, log.read_text()
    finish_all(good)
    assert "every sampled client withdrew" in log.read_text()
    history = json.loads((out / "history.json").read_text())
    assert [c["client_id"] for c in history["rounds"][0]["clients"]] == [2]


class _SendsItsLoss(SecureRound):
    """Sends its training loss with the masked update first (refused), then timings only."""

    refusals: list[UpdateRejectedError] = []

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
        try:
            loss = {"train_seconds": 1.0, "loss": 0.3}
            super().submit(round_number, specs, weights, num_examples, loss, reference=reference)
        except UpdateRejectedError as exc:
            self.refusals.append(exc)
        timing = {"train_seconds": 1.0}
        return super().submit(round_number, specs, weights, num_examples, timing, reference=reference)


def test_metrics_other_than_timings_are_refused_under_secure_aggregation() -> None:
    _SendsItsLoss.refusals.clear()  # of this test only
    weights = [np.full(100, 0.5, np.float32)]
    with _LiveRound({1: SecureRound, 2: SecureRound, 3: _SendsItsLoss}, weights) as live:
        assert [r.code for r in _SendsItsLoss.refusals] == ["INVALID_ARGUMENT"]
        assert "timings only" in str(_SendsItsLoss.refusals[0]) and "'loss'" in str(_SendsItsLoss.refusals[0])
        outcome = live.coordinator.close_round()
    assert {u.client_id: dict(u.metrics) for u in outcome.updates}[3] == {"train_seconds": 1.0}


class _RetriesAfterTheRoundClosed(SecureRound):
    """Sends its masked update again once unmasking has begun (its first reply was lost, say),
    then reveals as the protocol asks for ALREADY_EXISTS."""

    codes: list[str] = []

    def submit(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        connection, sent = self._connection, []
        original = connection.submit

        def keep(*call: Any, **named: Any) -> tuple[int, int]:
            sent.append((call, named))
            return original(*call, **named)

        connection.submit = keep  # type: ignore[method-assign]
        try:
            result = super().submit(*args, **kwargs)
        finally:
            del connection.submit
        self._stage(sa.Step.UNMASK)  # the round closed: the server is unmasking
        try:
            original(*sent[0][0], **sent[0][1])
        except UpdateRejectedError as exc:
            self.codes.append(exc.code)
        return result


def test_a_masked_update_retried_after_its_round_closed_is_already_exists() -> None:
    """Distinct changes weighted 10 and 20: the retry is answered ALREADY_EXISTS and the round
    holds each update once (two counted, their exact weighted mean), not the retried one twice."""
    _RetriesAfterTheRoundClosed.codes.clear()  # of this test only
    weights = [np.full(100, 0.5, np.float32), np.linspace(-1, 1, 7, dtype=np.float32)]
    with _LiveRound({1: SecureRound, 2: _RetriesAfterTheRoundClosed}, weights, change=True) as live:
        outcome = live.coordinator.close_round()
        scale = live.coordinator.secure_round.scale  # type: ignore[union-attr]
    assert _RetriesAfterTheRoundClosed.codes == ["ALREADY_EXISTS"]
    assert [u.client_id for u in outcome.updates] == [1, 2]
    for index, g in enumerate(weights):
        changes = [light_update(weights, c, 1)[index].astype(np.float64) - g for c in (1, 2)]
        assert all(np.abs(c).max() > 1e-3 for c in changes) and not np.array_equal(changes[0], changes[1])
        want = g + (10 * changes[0] + 20 * changes[1]) / 30
        np.testing.assert_allclose(outcome.weights[index], want, rtol=0, atol=2 * 0.5 / scale / 30 + 1e-7)


class _RetriesLater(SecureRound):
    """Reveals, then sends its masked update again once the round closed (`closed`) and once
    the next round opened (`reopened`), keeping the answers in `answers` by client."""

    closed = threading.Event()
    reopened = threading.Event()
    answers: dict[int, list[str]] = {}

    def submit(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        connection = self._connection
        self._sent: list[tuple[Any, Any]] = []
        original = connection.submit

        def keep(*call: Any, **named: Any) -> tuple[int, int]:
            self._sent.append((call, named))
            return original(*call, **named)

        connection.submit = keep  # type: ignore[method-assign]
        try:
            return super().submit(*args, **kwargs)
        finally:
            del connection.submit

    def reveal(self) -> None:
        super().reveal()
        for event in (self.closed, self.reopened):
            assert event.wait(60)
            call, named = self._sent[0]
            try:
                self._connection.submit(*call, **named)
                code = "OK"
            except UpdateRejectedError as exc:
                code = exc.code
            except StaleRoundError:
                code = "FAILED_PRECONDITION"
            self.answers.setdefault(self.steps.me, []).append(code)


def test_a_retried_update_is_already_exists_only_if_its_group_sum_was_counted() -> None:
    """Six clients split in two groups of three; client 6 sends ring words that are no update,
    so its group's sum is impossible and its members' updates are not counted. Retried after the
    round closed, and again once the next round opened, only the counted updates are answered
    ALREADY_EXISTS; the others are told their round is closed (FAILED_PRECONDITION)."""
    _RetriesLater.answers = {}
    _RetriesLater.closed, _RetriesLater.reopened = threading.Event(), threading.Event()
    weights = [np.full(100, 0.5, np.float32)]
    clients: dict[int, type[SecureRound]] = {c: _RetriesLater for c in range(1, 6)}
    live = _LiveRound({**clients, 6: _GarbageWords}, weights, change=True)
    live.strategy.isolation.suspects = frozenset(range(1, 7))  # as after an impossible sum
    with live:
        outcome = live.coordinator.close_round()
        secure = live.coordinator.secure_round
        assert secure is not None and len(secure.groups) == 2 and [len(g) for g in secure.groups] == [3, 3]
        counted = sorted(u.client_id for u in outcome.updates)
        (spoiled,) = [g for g in secure.groups if 6 in g]
        assert len(counted) == 3 and not set(counted) & spoiled
        _RetriesLater.closed.set()
        _wait_until(lambda: sum(len(a) for a in _RetriesLater.answers.values()) == 5)
        live.coordinator.open_round(2, outcome.weights)
        _RetriesLater.reopened.set()
        _wait_until(lambda: sum(len(a) for a in _RetriesLater.answers.values()) == 10)
    for client in range(1, 6):
        want = "ALREADY_EXISTS" if client in counted else "FAILED_PRECONDITION"
        assert _RetriesLater.answers[client] == [want, want], (client, _RetriesLater.answers)


def _wait_until(done: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_client_lines_lead_with_the_main_metric_and_its_personalized_twin() -> None:
    from fedgrpc.client.app import _short

    metrics = {
        "loss": 0.9, "accuracy": 0.6, "macro_f1": 0.5, "recall": 0.4,
        "personalized_loss": 0.7, "personalized_accuracy": 0.7, "personalized_recall": 0.6,
        "personalized_macro_f1": 0.65,
    }  # fmt: skip
    assert _short(metrics, "macro_f1") == (
        "loss 0.9000  macro_f1 0.5000  personalized_loss 0.7000  personalized_macro_f1 0.6500"
    )
    assert _short({"train_seconds": 1.0, "loss": 0.5, "accuracy": 0.25}) == "loss 0.5000  accuracy 0.2500"


def test_expected_under_secure_aggregation_counts_the_clients_that_shared() -> None:
    import secrets
    import threading

    from fedgrpc.client.connection import Connection
    from fedgrpc.common import secagg as sa
    from fedgrpc.common.config import RunSpec, SecAggSpec
    from fedgrpc.common.protocol import Instruction
    from fedgrpc.server.masked_sum import SecAggStrategy
    from fedgrpc.server.rounds import RoundCoordinator
    from fedgrpc.server.strategy import FedAvg
    from helpers import serving

    weights = [np.full(10, 0.5, np.float32)]
    run = RunSpec(num_clients=3, secagg=SecAggSpec(max_examples=1000))
    coordinator = RoundCoordinator(run, [TensorSpec("t0", "float32", (10,))], SecAggStrategy(FedAvg()))
    replies: dict[int, tuple[int, int]] = {}

    def client(client_id: int, port: int) -> None:
        with Connection(f"127.0.0.1:{port}", client_id, connect_timeout_s=20) as connection:
            task = connection.next_task(0, 10)
            while task.instruction is not Instruction.TRAIN:
                task = connection.next_task(0, 10)
            if client_id == 3:  # advertises its keys, then vanishes before sharing
                public = sa.public_bytes(sa.new_private_key())
                connection.advertise_keys(task.round, public, public, secrets.token_bytes(32))
                return
            secure = SecureRound(connection, run, task.round)
            secure.share_keys()
            replies[client_id] = secure.submit(
                task.round, task.specs, task.weights, 10, {}, reference=task.weights
            )

    with serving(coordinator) as endpoint:
        threads = [threading.Thread(target=client, args=(c, endpoint.port)) for c in (1, 2, 3)]
        for thread in threads:
            thread.start()
        assert coordinator.wait_ready(3, 20)
        coordinator.open_round(1, weights)
        secure = coordinator.secure_round
        assert secure is not None and secure.run_key_stages(3, lambda: False)
        assert coordinator.wait_for_updates(2, 20)
        for thread in threads:
            thread.join(30)
        coordinator.interrupt()
    assert sorted(replies.values()) == [(1, 2), (2, 2)]  # of the 2 that shared, not of 3


# -- the secure aggregation arithmetic as docs/protocol.md states it, against the code ----------

_POLY = (1 << 128) | 0x87  # x^128 + x^7 + x^2 + x + 1


def _gf_mul(a: int, b: int) -> int:
    product = 0
    while b:
        if b & 1:
            product ^= a
        b >>= 1
        a <<= 1
        if a >> 128:
            a ^= _POLY
    return product


def _gf_inverse(a: int) -> int:
    result, power = 1, a  # a^(2^128 - 2)
    exponent = (1 << 128) - 2
    while exponent:
        if exponent & 1:
            result = _gf_mul(result, power)
        power = _gf_mul(power, power)
        exponent >>= 1
    return result


def _interpolate_at_zero(points: list[tuple[int, int]]) -> int:
    secret = 0
    for j, (xj, yj) in enumerate(points):
        term = yj
        for m, (xm, _) in enumerate(points):
            if m != j:  # L_j(0) = prod x_m / (x_m - x_j); minus is XOR
                term = _gf_mul(term, _gf_mul(xm, _gf_inverse(xm ^ xj)))
        secret ^= term
    return secret


def test_shamir_shares_are_what_the_protocol_reference_says() -> None:
    from fedgrpc.common import secagg as sa

    secret = bytes(range(1, 33))
    shares = sa.split(secret, 3, 5)
    assert [s.index for s in shares] == [1, 2, 3, 4, 5]  # holder i gets x = i
    for chosen in ([0, 1, 2], [1, 3, 4], [4, 0, 2]):
        halves = [
            _interpolate_at_zero(
                [(shares[i].index, int.from_bytes(shares[i].value[half : half + 16], "big")) for i in chosen]
            )
            for half in (0, 16)
        ]
        assert b"".join(h.to_bytes(16, "big") for h in halves) == secret
    # two shares of a threshold-3 secret interpolate to something else
    wrong = _interpolate_at_zero([(s.index, int.from_bytes(s.value[:16], "big")) for s in shares[:2]])
    assert wrong.to_bytes(16, "big") != secret[:16]


def test_the_encoding_is_the_stated_float64_arithmetic() -> None:
    from fedgrpc.common import secagg as sa

    rng = np.random.default_rng(5)
    w, g = rng.standard_normal(1000).astype(np.float32), rng.standard_normal(1000).astype(np.float32)
    n, scale, bound = 37, 12345.678, 1.5
    change = w.astype(np.float64) - g.astype(np.float64)
    words = np.rint(np.clip(change, -bound, bound) * (float(n) * scale)).astype(np.int64).astype(np.uint32)
    encoded = sa.encode([change], n, scale, bound)
    np.testing.assert_array_equal(encoded[0], words)
    assert encoded[1].tolist() == [n]


def test_partitions_follow_the_recipes_of_the_protocol_reference() -> None:
    from fedgrpc.common.partition import all_partitions

    labels = np.random.default_rng(0).integers(0, 10, 1001)
    n, clients, seed = len(labels), 3, 7
    order = np.random.default_rng(seed).permutation(n)  # iid: equal cuts, the remainder left out
    size = n // clients
    for k, shard in enumerate(all_partitions(labels, clients, seed, "iid")):
        np.testing.assert_array_equal(shard, order[k * size : (k + 1) * size])
    rng = np.random.default_rng([seed, 0])  # quantity: the first draw already gives everyone 2
    order = rng.permutation(n)
    cuts = (np.cumsum(rng.dirichlet([1.0] * clients))[:-1] * n).astype(np.int64)
    for got, want in zip(
        all_partitions(labels, clients, seed, "quantity:1.0"), np.split(order, cuts), strict=True
    ):
        np.testing.assert_array_equal(got, np.sort(want))
    rng = np.random.default_rng(seed)  # classes:2
    order = rng.permutation(n)
    order = order[np.argsort(labels[order], kind="stable")]
    piece = n // (clients * 2)
    dealt = rng.permutation(clients * 2)
    for c, got in enumerate(all_partitions(labels, clients, seed, "classes:2")):
        want = np.concatenate([order[j * piece : (j + 1) * piece] for j in dealt[c * 2 : c * 2 + 2]])
        np.testing.assert_array_equal(got, np.sort(want))
