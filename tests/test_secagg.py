"""Secure aggregation: the primitives, what the server holds, and whole rounds with clients that
drop out or lie at every stage (real fl-server and client processes)."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from fedgrpc.client.connection import Connection
from fedgrpc.client.light import light_examples, light_update
from fedgrpc.client.secagg import SecureRound
from fedgrpc.common import secagg as sa
from fedgrpc.common.codec import TensorSpec
from fedgrpc.common.config import RunSpec, SecAggSpec
from fedgrpc.common.errors import SecAggError, StaleRoundError
from fedgrpc.common.processes import free_port
from fedgrpc.common.protocol import Instruction
from fedgrpc.server.checkpoint import CheckpointStore
from fedgrpc.server.masked_sum import APART_KEY, SecAggStrategy
from fedgrpc.server.rounds import RoundCoordinator
from fedgrpc.server.strategy import FedAvg
from helpers import (
    ENV,
    STARTED,
    finish,
    finish_all,
    server_command,
    serving,
    start,
    start_clients,
    wait_for_line,
)

PEER = Path(__file__).with_name("secagg_peer.py")

# -- the primitives -----------------------------------------------------------------------------


def test_shamir_rebuilds_from_any_threshold_shares_and_not_from_fewer() -> None:
    secret = secrets.token_bytes(32)
    shares = sa.split(secret, 3, 5)
    assert {s.index for s in shares} == {1, 2, 3, 4, 5}
    assert sa.combine([shares[4], shares[0], shares[2]]) == secret
    assert sa.combine(shares) == secret
    assert sa.combine(shares[:2]) != secret


def test_shares_travel_encrypted_to_their_pair_and_round_only() -> None:
    alice, bob, eve = sa.new_private_key(), sa.new_private_key(), sa.new_private_key()
    context = sa.context("run", 4, b"s" * 16, "share", 1, 2)
    key = sa.agree(alice, sa.public_bytes(bob), context)
    assert key == sa.agree(bob, sa.public_bytes(alice), context)
    seed, mask = sa.split(secrets.token_bytes(32), 2, 3), sa.split(secrets.token_bytes(32), 2, 3)
    ciphertext = sa.encrypt(key, sa.encode_shares(1, seed[1], mask[1]), sa.share_aad(1, 2, 4))
    assert sa.decode_shares(sa.decrypt(key, ciphertext, sa.share_aad(1, 2, 4))) == (1, seed[1], mask[1])
    with pytest.raises(SecAggError, match="does not decrypt"):
        sa.decrypt(key, ciphertext, sa.share_aad(1, 2, 5))  # replayed into another round
    with pytest.raises(SecAggError, match="does not decrypt"):
        sa.decrypt(sa.agree(eve, sa.public_bytes(bob), context), ciphertext, sa.share_aad(1, 2, 4))


def test_thresholds_need_more_than_half_of_the_holders() -> None:
    assert [sa.threshold(h, 0.5) for h in (2, 3, 4, 5, 15, 20)] == [2, 2, 3, 3, 8, 11]
    assert sa.threshold(20, 0.9) == 19


def test_small_rounds_are_complete_graphs_large_ones_sparse_and_symmetric() -> None:
    small = sa.neighbours(range(1, 6), "seed")
    assert all(len(vs) == 4 for vs in small.values())
    large = sa.neighbours(range(1, 101), "seed")
    assert {len(vs) for vs in large.values()} == {sa.neighbour_degree(100)} == {14}
    assert all(u in large[v] for u, vs in large.items() for v in vs)
    reached, frontier = {1}, [1]  # connected
    while frontier:
        frontier = [v for u in frontier for v in large[u] if v not in reached]
        reached.update(frontier)
    assert reached == set(range(1, 101))
    assert sa.neighbours(range(1, 101), "another") != large  # seeded per round


def test_a_secret_is_rebuilt_past_bad_shares_wherever_they_sit() -> None:
    """15 holders, 8 needed, the owner's own share first and two bad ones right after it: every
    combination of the first ones in order would hold a bad share; the rebuild still finds the
    secret and names the two."""
    from fedgrpc.server.secagg import SecAggRound, _Client
    from fedgrpc.server.unmasking import matches_commitment, rebuild

    seed = secrets.token_bytes(32)
    shares = sa.split(seed, 8, 15)
    secure = SecAggRound("run", 1, range(1, 16), SecAggSpec())
    secure.thresholds = {1: 8}
    secure.clients[1] = _Client(b"", b"", sa.commitment(seed))
    for revealer, share in zip(range(1, 16), shares, strict=True):
        forged = sa.Share(share.index, secrets.token_bytes(32)) if revealer in (2, 3) else share
        secure.clients[1].reveals.append((revealer, "self_mask", forged))
    assert rebuild(secure, 1, "self_mask", matches_commitment(sa.commitment(seed))) == seed
    assert secure.suspects == {2, 3}


def test_encoding_keeps_the_weighted_sum_within_a_step_and_says_when_the_ring_is_too_small() -> None:
    rng = np.random.default_rng(0)
    changes = [[rng.normal(0, 0.1, 1000)] for _ in range(3)]
    counts = [100, 250, 7]
    scale = sa.ring_scale(3, 1000, 1.0)
    total = [np.zeros(1000, np.uint32), np.zeros(1, np.uint32)]
    for change, n in zip(changes, counts, strict=True):
        for acc, part in zip(total, sa.encode(change, n, scale, 1.0), strict=True):
            np.add(acc, part, out=acc)
    sums, count = sa.decode(total, scale)
    assert count == 357
    want = sum(np.clip(c[0], -1, 1) * n for c, n in zip(changes, counts, strict=True))
    np.testing.assert_allclose(sums[0], want, rtol=0, atol=3 * 0.5 / scale)
    with pytest.raises(SecAggError, match="lower --secagg-max-examples"):
        sa.ring_scale(100, 10**8, 1.0)


@pytest.mark.parametrize("clients", [2, 4, 8, 100])
def test_updates_at_every_limit_at_once_do_not_wrap_around(clients: int) -> None:
    """Every client at max_examples, every change at +bound: the largest sum the ring must hold
    (rounding up included) decodes to +bound, not to a wrapped-around negative."""
    scale = sa.ring_scale(clients, 1000, 1.0)
    total = [np.zeros(3, np.uint32), np.zeros(1, np.uint32)]
    for _ in range(clients):
        for acc, part in zip(total, sa.encode([np.full(3, 5.0)], 1000, scale, 1.0), strict=True):
            np.add(acc, part, out=acc)
    sums, count = sa.decode(total, scale)
    np.testing.assert_allclose(sums[0] / count, 1.0, rtol=1e-6)  # within rounding, positive


def test_keys_no_exchange_works_with_are_refused() -> None:
    with pytest.raises(SecAggError, match="not a usable X25519 public key"):
        sa.check_public_key(bytes(32))  # the all-zero point: every agreement with it fails
    sa.check_public_key(sa.public_bytes(sa.new_private_key()))


def test_group_testing_deals_suspects_to_both_groups_and_narrows_down_to_one() -> None:
    from fedgrpc.server.isolation import Isolation, split

    groups = split(list(range(1, 9)), frozenset({2, 5, 7}), "seed")
    assert len(groups) == 2 and groups[0] | groups[1] == set(range(1, 9)) and not groups[0] & groups[1]
    assert sorted(len(g) for g in groups) == [4, 4]
    assert sorted(len(g & {2, 5, 7}) for g in groups) == [1, 2]
    isolation = Isolation()
    assert isolation.groups(list(range(1, 9)), "s") == []  # nothing suspected: one group
    assert isolation.observe(1, [frozenset(range(1, 9))])  # the whole round spoiled: all suspects
    offender = 6
    for attempt in range(10):
        spoiled = [g for g in isolation.groups(list(range(1, 9)), f"s{attempt}") if offender in g]
        assert isolation.observe(2, spoiled)  # each impossible sum makes progress
        if isolation.excluded:
            break
    assert list(isolation.excluded) == [offender] and attempt <= 3 and not isolation.suspects
    assert not isolation.observe(3, [])  # nothing spoiled: nothing learned


def test_no_group_of_a_suspecting_attempt_falls_below_the_floor() -> None:
    """Six or more split into two groups of at least three; four or five aggregate as one group
    of at least three, some suspects sitting out, every cleared client in; never a group of two
    (the old rule let two clients that were not suspected aggregate alone)."""
    from fedgrpc.server.isolation import MIN_GROUP_SIZE, Isolation

    assert MIN_GROUP_SIZE == 3
    isolation = Isolation(suspects=frozenset({1, 2}))
    assert isolation.groups([1, 2, 3, 4, 5], "s") in ([frozenset({1, 3, 4, 5})], [frozenset({2, 3, 4, 5})])
    for seed in range(20):
        for n in (4, 5):
            for suspects in ({1, 2, 3}, set(range(1, n + 1)), {1, 2, 3, 4}):
                (group,) = Isolation(suspects=frozenset(suspects)).groups(list(range(1, n + 1)), f"{seed}")
                assert MIN_GROUP_SIZE <= len(group) < n and suspects - group, (n, suspects, group)
                assert set(range(1, n + 1)) - suspects <= group  # cleared clients are never left out
        groups = Isolation(suspects=frozenset({1, 2, 3})).groups(list(range(1, 7 + seed % 3)), f"{seed}")
        assert len(groups) == 2 and min(len(g) for g in groups) >= MIN_GROUP_SIZE


def _hunt(n: int, offender: int, seed: str, spoils: object = None) -> tuple[dict[int, str], int]:
    """Attempts until the offender is excluded (or 60 attempts): each spoils the group holding
    `offender` when `spoils(group, eligible)` says so (default: always). Returns the excluded
    clients and the attempts made; every group is checked against the floor on the way."""
    from fedgrpc.server.isolation import MIN_GROUP_SIZE, Isolation

    isolation, eligible = Isolation(), list(range(1, n + 1))
    decide = spoils if callable(spoils) else (lambda group, everyone: True)
    for attempt in range(60):
        groups = isolation.groups(eligible, f"{seed}:{attempt}") or [frozenset(eligible)]
        assert all(len(g) >= MIN_GROUP_SIZE for g in groups) or groups == [frozenset(eligible)]
        failed = [g for g in groups if offender in g and decide(g, eligible)]
        isolation.observe(attempt + 1, failed)
        if isolation.excluded:
            return isolation.excluded, attempt + 1
    return isolation.excluded, 60


def test_four_or_five_clients_isolate_one_offender_with_one_group_and_suspects_sitting_out() -> None:
    """An offender that spoils every sum it is in is excluded, wherever it sits, after a bounded
    number of attempts: the suspects sitting out rotate, so it cannot sit out twice in a row
    at one step of the narrowing. Each impossible sum loses its round (another attempt at it
    would differ from this one by a sum of one or two); among six, the split that follows adds
    up to the impossible sum, and the round is trained again."""
    from fedgrpc.server.isolation import Isolation

    for n in (4, 5):
        for offender in range(1, n + 1):
            for seed in range(10):
                excluded, attempts = _hunt(n, offender, f"{n}:{offender}:{seed}")
                assert list(excluded) == [offender] and attempts <= 7, (n, offender, seed, attempts)
    for n, lost in ((4, True), (5, True), (6, False), (9, False)):
        isolation = Isolation()
        isolation.groups(list(range(1, n + 1)), "s")
        assert isolation.observe(1, [frozenset(range(1, n + 1))])  # progress: suspects named
        assert bool(isolation.lost) is lost
        isolation.groups(list(range(1, n + 1)), "t")
        assert not isolation.lost and not isolation.observe(1, [])


def test_an_offender_that_behaves_when_it_likes_never_gets_an_honest_client_named() -> None:
    """A possible sum clears nobody: an offender that behaves whenever someone sits out (it sees
    its neighbours, so it knows), or at random, may go unfound, but no honest client is named."""
    import random

    rng = random.Random(5)
    strategies = {
        "behaves when someone sits out": lambda group, everyone: len(group) == len(everyone),
        "at random": lambda group, everyone: rng.random() < 0.5,
    }
    for n in (4, 5, 6, 7):
        for offender in range(1, n + 1):
            for name, spoils in strategies.items():
                for seed in range(5):
                    excluded, _ = _hunt(n, offender, f"{name}{seed}", spoils)
                    assert set(excluded) <= {offender}, (n, offender, name, excluded)


def test_with_three_clients_an_impossible_sum_cannot_be_narrowed_and_nobody_is_named() -> None:
    """Leaving anyone out of three would unmask a sum of two: every attempt is one group of all,
    and its impossible sum loses the round (no failure to count), nobody named."""
    from fedgrpc.server.isolation import Isolation

    isolation = Isolation()
    for attempt in range(5):
        assert isolation.groups([1, 2, 3], f"s{attempt}") == []
        assert not isolation.observe(attempt + 1, [frozenset({1, 2, 3})])
        assert "among 3 clients the sender cannot be isolated" in isolation.lost
        assert not isolation.excluded and not isolation.suspects
    assert isolation.groups([1, 2, 3], "t") == [] and not isolation.lost  # a new attempt
    assert not isolation.observe(6, []) and not isolation.lost
    isolation = Isolation(suspects=frozenset({1, 2}))  # suspected among four, one of them gone since
    assert isolation.groups([1, 2, 3], "u") == [] and not isolation.suspecting


def test_a_sit_out_group_left_with_two_updates_is_not_unmasked() -> None:
    """Four clients, client 4 sitting out: the group {1, 2, 3} is one group, but a group of a
    suspecting attempt all the same; with one of its updates missing, the two left are not
    unmasked (the old rule checked the floor only when there were two groups or more)."""
    from fedgrpc.server.secagg import SecAggRound

    secure = SecAggRound("run", 1, [1, 2, 3, 4], SecAggSpec(), groups=[frozenset({1, 2, 3})])
    secure.group_of = {1: 0, 2: 0, 3: 0}
    secure.shared = frozenset({1, 2, 3})
    secure.stage = "mask"
    assert not secure.run_unmasking([1, 2], 0.1, lambda: False)
    assert secure.stage == "aborted" and "no group holds 3 masked updates" in secure.reason


def test_suspicion_is_cleared_after_clean_split_attempts() -> None:
    """A suspect that behaves while suspected is not kept splitting every later round in halves."""
    from fedgrpc.server.isolation import CLEAR_AFTER, Isolation

    isolation = Isolation(suspects=frozenset({1, 2, 3}))
    for attempt in range(CLEAR_AFTER):
        assert isolation.suspects and len(isolation.groups(list(range(1, 9)), f"s{attempt}")) == 2
        assert not isolation.observe(attempt + 1, [])
    assert not isolation.suspects and isolation.groups(list(range(1, 9)), "s") == []
    isolation = Isolation(suspects=frozenset({1, 2, 3}))
    for attempt in range(CLEAR_AFTER - 1):  # a spoiled split in between starts the count again
        isolation.groups(list(range(1, 9)), f"t{attempt}")
        isolation.observe(attempt + 1, [])
    (spoiled, _) = isolation.groups(list(range(1, 9)), "u")
    isolation.observe(9, [spoiled])
    isolation.groups(list(range(1, 9)), "v")
    isolation.observe(10, [])
    assert isolation.suspects


def test_an_excluded_client_stays_excluded_after_a_restart(tmp_path: Path) -> None:
    """The exclusion and the disputed pairs travel in the checkpoint's strategy state, beside a
    server optimizer's."""
    from fedgrpc.server.fedopt import FedAdam

    strategy = SecAggStrategy(FedAdam(0.01))
    strategy.isolation.excluded[4] = "spoiled every group"
    strategy.apart = {frozenset((1, 3)), frozenset((2, 3))}  # disputed pairs
    store = CheckpointStore(tmp_path / "checkpoint")
    run = RunSpec(num_clients=4, secagg=SecAggSpec())
    store.save(run, 1, [np.zeros(3, np.float32)], [], strategy.state())
    checkpoint = store.load()
    assert checkpoint is not None
    restarted = SecAggStrategy(FedAdam(0.01))
    restarted.restore(checkpoint.strategy_state)
    assert list(restarted.isolation.excluded) == [4]
    assert restarted.apart == {frozenset((1, 3)), frozenset((2, 3))}


# -- what the server holds: an in-process coordinator, real gRPC, real client code --------------


class _LiveRound:
    """One secure round over real gRPC: an in-process coordinator and endpoint, and a thread per
    client running SecureRound (of the given class); every masked update is folded in when the
    block starts, and the caller closes the round (or not)."""

    def __init__(
        self, clients: dict[int, type[SecureRound]], weights: list[np.ndarray], *, change: bool = False
    ) -> None:
        """`change`: each client sends light_update's change and 10 x its id examples; else none."""
        self.run = RunSpec(num_clients=len(clients), secagg=SecAggSpec(max_examples=1000))
        specs = [TensorSpec(f"t{i}", "float32", w.shape) for i, w in enumerate(weights)]
        self.strategy = SecAggStrategy(FedAvg())
        self.coordinator = RoundCoordinator(self.run, specs, self.strategy, secagg_timeout_s=20)
        self._clients, self._weights, self._change = clients, weights, change
        self._errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> _LiveRound:
        self._serving = serving(self.coordinator)
        self.port = port = self._serving.__enter__().port
        for client_id, kind in self._clients.items():
            thread = threading.Thread(target=self._client, args=(client_id, kind, port))
            thread.start()
            self._threads.append(thread)
        coordinator = self.coordinator
        assert coordinator.wait_ready(len(self._clients), 20)
        coordinator.open_round(1, self._weights)
        secure = coordinator.secure_round
        assert secure is not None and secure.run_key_stages(20, lambda: False)
        assert coordinator.wait_for_updates(len(self._clients), 20)
        while coordinator.fold_queue_depth:  # every accepted update folded into the ring
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.coordinator.interrupt()
        for thread in self._threads:
            thread.join(30)
        self._serving.__exit__(None, None, None)
        assert not self._errors, self._errors

    def _client(self, client_id: int, kind: type[SecureRound], port: int) -> None:
        try:
            with Connection(f"127.0.0.1:{port}", client_id, connect_timeout_s=20) as connection:
                task = connection.next_task(0, 10)
                while task.instruction is not Instruction.TRAIN:
                    task = connection.next_task(0, 10)
                secure = kind(connection, self.run, task.round)
                secure.share_keys()
                sent = light_update(task.weights, client_id, task.round) if self._change else task.weights
                secure.submit(task.round, task.specs, sent, 10 * client_id, {}, reference=task.weights)
                secure.reveal()
        except BaseException as exc:  # noqa: BLE001 - reported when the block ends
            self._errors.append(exc)


class _RevealsIfAsked(SecureRound):
    """Reveals when its update is in the sum to unmask; told it is not, it stops there."""

    def reveal(self) -> None:
        with contextlib.suppress(StaleRoundError):
            super().reveal()


def test_a_group_of_a_split_left_with_two_updates_is_not_unmasked() -> None:
    """Six clients split in two groups of three; one update of the first group does not count
    (it arrived too late, say): the two left are not unmasked, as their sum would be a sum of two."""
    weights = [np.full(100, 0.5, np.float32)]
    live = _LiveRound(dict.fromkeys(range(1, 7), _RevealsIfAsked), weights)
    live.strategy.isolation.suspects = frozenset(range(1, 7))  # as after an impossible sum
    with live:
        secure = live.coordinator.secure_round
        assert secure is not None and [len(g) for g in secure.groups] == [3, 3]
        first, second = secure.groups
        assert secure.run_unmasking(sorted(set(range(1, 7)) - {min(first)}), 20, lambda: False)
        assert secure.submitted == second
        live.coordinator.interrupt()


def _chi_square_of_top_bytes(words: np.ndarray) -> float:
    counts = np.bincount((words >> 24).astype(np.int64), minlength=256)
    expected = words.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_what_the_server_holds_before_unmasking_is_uniform_and_the_sum_is_exact() -> None:
    weights = [np.full(60_000, 0.5, np.float32), np.zeros(7, np.float32)]
    with _LiveRound({1: SecureRound, 2: SecureRound, 3: SecureRound}, weights) as live:
        secure = live.coordinator.secure_round
        assert secure is not None
        (ring,) = live.strategy.masked_sum().values()  # one group
        held = sa.flatten(ring)
        secure.run_unmasking([1, 2, 3], 20, lambda: False)  # the clients reveal their shares
        unmasked = sa.flatten(secure.unmask(live.strategy.masked_sum())[0])
    # Every client sent "no change": unmasked, the words are all zero but the count. Masked, the
    # top byte of 60,007 words falls in 256 bins as uniform words would: chi-square with 255
    # degrees of freedom stays below 350 (p = 1e-4); each of the 32 bits is set half the time.
    assert _chi_square_of_top_bytes(held) < 350
    bits = np.unpackbits(held.view(np.uint8)).reshape(-1, 32).mean(axis=0)
    assert np.all(np.abs(bits - 0.5) < 5 * 0.5 / np.sqrt(held.size))
    assert _chi_square_of_top_bytes(unmasked) > 10_000  # the same test tells the unmasked sum apart
    np.testing.assert_array_equal(unmasked[:-1], 0)
    assert unmasked[-1] == 60  # 10 + 20 + 30 examples


def test_the_unmasked_round_equals_the_plain_mean() -> None:
    """Three distinct changes, weighted 10, 20 and 30: the unmasked result is their weighted
    mean, within the encoding's rounding (half a step per client)."""
    weights = [np.full(1000, 0.5, np.float32), np.linspace(-1, 1, 7, dtype=np.float32)]
    with _LiveRound({1: SecureRound, 2: SecureRound, 3: SecureRound}, weights, change=True) as live:
        got = live.coordinator.close_round().weights
        scale = live.coordinator.secure_round.scale  # type: ignore[union-attr]
    for index, g in enumerate(weights):
        changes = [light_update(weights, c, 1)[index].astype(np.float64) - g for c in (1, 2, 3)]
        assert all(np.abs(c).max() > 1e-3 for c in changes) and not np.array_equal(changes[0], changes[1])
        want = g + sum(10 * c * ch for c, ch in zip((1, 2, 3), changes, strict=True)) / 60
        np.testing.assert_allclose(got[index], want, rtol=0, atol=3 * 0.5 / scale / 60 + 1e-7)


class _GarbageWords(SecureRound):
    """Shares its keys honestly, then submits random ring words instead of an encoded update."""

    def submit(
        self,
        round_number: int,
        specs: Sequence[TensorSpec],
        weights: Sequence[np.ndarray],
        *args: object,
        **kw: object,
    ) -> tuple[int, int]:
        self.steps.held = self.steps.open_shares(self._stage(sa.Step.MASK).shares)
        rng = np.random.default_rng(7)
        words = [rng.integers(0, 2**32, np.shape(w), dtype=np.uint32) for w in weights]
        count_spec = TensorSpec(sa.COUNT_TENSOR, "uint32", (1,))
        arrays = [*words, np.array([3], np.uint32)]
        return self._connection.submit(
            self.round, [*specs, count_spec], arrays, 1, {}, method="secagg", session=self._session
        )


def test_random_ring_words_instead_of_an_update_abort_the_round_and_change_nothing() -> None:
    weights = [np.full(1000, 0.5, np.float32)]
    with _LiveRound({1: SecureRound, 2: SecureRound, 3: _GarbageWords}, weights) as live:
        with pytest.raises(SecAggError, match="malformed masked update|not an encoded one"):
            live.coordinator.close_round()
        np.testing.assert_array_equal(live.coordinator.global_weights[0], weights[0])


# -- whole runs: fl-server, light clients, and a peer that drops out or lies ----------------------


def _expected(weights: list[np.ndarray], counted: Sequence[int]) -> list[np.ndarray]:
    total = sum(light_examples(c) for c in counted)
    out = []
    for index, g in enumerate(weights):
        change = sum(
            light_examples(c) * (light_update(weights, c, 1)[index].astype(np.float64) - g) for c in counted
        )
        out.append(g + change / total)
    return out


def _run_with_peer(tmp_path: Path, data: Path, mode: str) -> tuple[int, Path, Path]:
    """fl-server --secagg for one round of 3: light clients 2 and 3, and client 1 in `mode`."""
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    flags = ("--secagg", "--secagg-timeout", "6", "--round-timeout", "8", "--finish-grace", "1")
    server = start(*server_command(port, data, out, rounds=1, clients=3, extra=flags), log=log)
    clients = start_clients(port, data, tmp_path, ids=(2, 3), extra=("--insecure", "--light"))
    peer_log = tmp_path / "peer.log"
    peer = subprocess.Popen(
        [sys.executable, str(PEER), "--server", f"127.0.0.1:{port}", "--id", "1", "--mode", mode,
         "--out", str(tmp_path / "global.npz")],
        stdout=peer_log.open("ab"), stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip
    STARTED.append(peer)
    code = finish(server, log)
    if code == 0:
        finish_all(clients)
    assert finish(peer, peer_log) == 0, peer_log.read_text()
    return code, out, log


@pytest.mark.parametrize(
    ("mode", "counted", "said"),
    [
        # U1 = 3, U2 = 2: the others mask only with each other
        ("advertise", (2, 3), "2 of 3 clients shared keys; going on without client 1"),
        # its pairwise masks removed with its mask key, rebuilt from the others' shares
        ("share", (2, 3), "2 of 3 clients submitted a masked update; going on without client 1"),
        # counted; its self-mask seed rebuilt without it
        ("submit", (1, 2, 3), "2 of 3 clients revealed their shares; going on without client 1"),
        # forged shares of client 2's and 3's seeds: each rebuilt from other shares, the liar named
        ("lie", (1, 2, 3), "revealed by client(s) [1] do not fit the others"),
        # client 2 got shares of another secret from 1: client 1's seed rebuilt from 1's and 3's
        ("bad-shares", (1, 2, 3), "client 1's self mask revealed by client(s) [2] do not fit the others"),
        ("malformed", (2, 3), "2 of 3 clients submitted a masked update"),  # refused, as if it dropped
    ],
)
def test_a_round_survives_a_peer_that_drops_out_or_lies(
    tmp_path: Path, synthetic_npz: Path, mode: str, counted: tuple[int, ...], said: str
) -> None:
    code, out, log = _run_with_peer(tmp_path, synthetic_npz, mode)
    assert code == 0, log.read_text()
    with np.load(tmp_path / "global.npz") as npz:
        start_weights = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    checkpoint = CheckpointStore(out / "checkpoint").load()
    assert checkpoint is not None and checkpoint.round == 1
    for got, want in zip(checkpoint.weights, _expected(start_weights, counted), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    history = json.loads((out / "history.json").read_text())
    assert sorted(c["client_id"] for c in history["rounds"][0]["clients"]) == list(counted)
    assert said in log.read_text()
    if mode == "malformed":
        assert "refused: INVALID_ARGUMENT" in (tmp_path / "peer.log").read_text()


def test_too_few_survivors_abort_the_round_cleanly(tmp_path: Path, synthetic_npz: Path) -> None:
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    flags = ("--secagg", "--secagg-timeout", "4", "--round-timeout", "4")
    server = start(*server_command(port, synthetic_npz, out, rounds=1, clients=3, extra=flags), log=log)
    start_clients(
        port, synthetic_npz, tmp_path, ids=(1,), extra=("--insecure", "--light", "--connect-timeout", "20")
    )
    for peer_id in (2, 3):
        STARTED.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(PEER),
                    "--server",
                    f"127.0.0.1:{port}",
                    "--id",
                    str(peer_id),
                    "--mode",
                    "share",
                    "--out",
                    str(tmp_path / f"global-{peer_id}.npz"),
                ],
                stdout=(tmp_path / f"peer-{peer_id}.log").open("ab"),
                stderr=subprocess.STDOUT,
                env=ENV,
            )  # fmt: skip
        )
    assert finish(server, log) == 2
    text = log.read_text()
    assert "secure aggregation aborted (1 in a row)" in text and "too few clients survived" in text
    assert "3 attempts in a row at round 1 could not be securely aggregated" in text
    checkpoint = CheckpointStore(out / "checkpoint").load()
    assert checkpoint is not None and checkpoint.round == 0  # no partial result was ever applied


def _peer(
    port: int, tmp_path: Path, client_id: int, mode: str, *rest: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start tests/secagg_peer.py as client `client_id` in `mode`; returns it and its log."""
    log = tmp_path / f"peer-{client_id}.log"
    process = subprocess.Popen(
        [sys.executable, str(PEER), "--server", f"127.0.0.1:{port}", "--id", str(client_id),
         "--mode", mode, "--out", str(tmp_path / f"global-{client_id}.npz"), *rest],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip
    STARTED.append(process)
    return process, log


def _replay(start_weights: Sequence[np.ndarray], counted: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """The global weights after light clients' rounds, `counted[r]` the clients of round r + 1
    (none: a lost round, the weights unchanged)."""
    weights = [np.asarray(w, np.float64) for w in start_weights]
    for number, clients in enumerate(counted, start=1):
        if not clients:
            continue
        sent = {c: light_update([w.astype(np.float32) for w in weights], c, number) for c in clients}
        total = sum(light_examples(c) for c in clients)
        weights = [
            g + sum(light_examples(c) * (sent[c][i].astype(np.float64) - g) for c in clients) / total
            for i, g in enumerate(weights)
        ]
    return weights


def test_a_holder_that_leaves_out_a_share_gets_no_honest_client_excluded(
    tmp_path: Path, synthetic_npz: Path
) -> None:
    """Client 2 shares its keys, then goes silent; client 3 reveals its shares but not its share
    of client 2's mask key, so the key cannot be rebuilt and the attempt aborts. Nobody is left
    out for it: the pair becomes a dispute (no longer neighbours), and in the next attempt both
    take part honestly and all three updates are counted."""
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    flags = ("--secagg", "--secagg-timeout", "6", "--round-timeout", "8", "--finish-grace", "1")
    server = start(*server_command(port, synthetic_npz, out, rounds=1, clients=3, extra=flags), log=log)
    wait_for_line(log, "waiting for 3 clients", process=server)
    initial = CheckpointStore(out / "checkpoint").load()
    assert initial is not None
    clients = start_clients(port, synthetic_npz, tmp_path, ids=(1,), extra=("--insecure", "--light"))
    peers = [_peer(port, tmp_path, 2, "share", "--rejoin"), _peer(port, tmp_path, 3, "omit", "--rejoin")]
    assert finish(server, log) == 0, log.read_text()
    finish_all(clients)
    finish_all(peers)
    text = log.read_text()
    assert "1 shares of client 2's mask key arrived and 2 are needed" in text
    assert "client(s) [3] revealed their shares but none of client 2's mask key" in text
    assert "left out from now on" not in text
    for _, peer_log in peers:
        assert "round 1: revealed" in peer_log.read_text()  # the second attempt, done right
    history = json.loads((out / "history.json").read_text())
    assert [c["client_id"] for c in history["rounds"][0]["clients"]] == [1, 2, 3]
    final = CheckpointStore(out / "checkpoint").load()
    assert final is not None and final.round == 1
    for got, want in zip(final.weights, _replay(initial.weights, [(1, 2, 3)]), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_a_holder_withholding_a_different_share_each_attempt_cannot_stop_the_run(
    tmp_path: Path, synthetic_npz: Path
) -> None:
    """With --secagg-threshold 0.9 every share is needed. Client 4 leaves out of each reveal the
    self-mask share of another owner: each attempt aborts on a new dispute, which is progress,
    not a failed attempt, so the three-failures stop never comes; once 4 has no neighbour left
    it sits out and the others close the round. The disputed pairs are in the checkpoint."""
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    flags = ("--secagg", "--secagg-threshold", "0.9", "--secagg-timeout", "10", "--round-timeout", "20",
             "--finish-grace", "1")  # fmt: skip
    server = start(*server_command(port, synthetic_npz, out, rounds=1, clients=4, extra=flags), log=log)
    wait_for_line(log, "waiting for 4 clients", process=server)
    initial = CheckpointStore(out / "checkpoint").load()
    assert initial is not None
    clients = start_clients(port, synthetic_npz, tmp_path, ids=(1, 2, 3), extra=("--insecure", "--light"))
    peer = _peer(port, tmp_path, 4, "withhold")
    assert finish(server, log) == 0, log.read_text()
    finish_all(clients)
    finish_all([peer])
    text = log.read_text()
    for owner in (1, 2, 3):
        assert f"client(s) [4] revealed their shares but none of client {owner}'s self mask" in text
    assert "attempts in a row" not in text and "left out from now on" not in text
    history = json.loads((out / "history.json").read_text())
    assert [c["client_id"] for c in history["rounds"][0]["clients"]] == [1, 2, 3]
    final = CheckpointStore(out / "checkpoint").load()
    assert final is not None and final.round == 1
    assert final.strategy_state[APART_KEY].tolist() == [[1, 4], [2, 4], [3, 4]]
    for got, want in zip(final.weights, _replay(initial.weights, [(1, 2, 3)]), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_a_client_masking_an_impossible_count_every_round_is_isolated_and_the_run_goes_on(
    tmp_path: Path, synthetic_npz: Path
) -> None:
    """Client 6 masks an example count of 2^30 every round. Round 1's sum is impossible; the
    attempts after it aggregate in two groups of three, the spoiled group's members become
    suspects, and once one is left it is excluded and named. Every round closes with the exact
    mean of the honest clients whose group's sum was used, and the server exits 0."""
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    flags = ("--secagg", "--secagg-timeout", "10", "--round-timeout", "20", "--finish-grace", "1")
    server = start(*server_command(port, synthetic_npz, out, rounds=4, clients=6, extra=flags), log=log)
    wait_for_line(log, "waiting for 6 clients", process=server)
    initial = CheckpointStore(out / "checkpoint").load()
    assert initial is not None
    honest = (1, 2, 3, 4, 5)
    clients = start_clients(port, synthetic_npz, tmp_path, ids=honest, extra=("--insecure", "--light"))
    peer = _peer(port, tmp_path, 6, "count")
    assert finish(server, log) == 0, log.read_text()
    finish_all(clients)
    text = log.read_text()
    assert "client 6 is left out of secure aggregation from now on" in text
    assert "non-finite" not in text and "attempts in a row" not in text
    assert "the unmasked example count is" in text  # said why
    history = json.loads((out / "history.json").read_text())
    counted = [[c["client_id"] for c in r["clients"]] for r in history["rounds"]]
    assert len(counted) == 4 and all(6 not in r and len(r) >= 3 for r in counted), counted
    assert counted[-1] == list(honest)  # after the exclusion: every honest client, one group again
    final = CheckpointStore(out / "checkpoint").load()
    assert final is not None and final.round == 4
    for got, want in zip(final.weights, _replay(initial.weights, counted), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    finish_all([peer])  # it waited, left out, until the run finished


@pytest.mark.parametrize("n", [4, 5])
def test_with_four_or_five_clients_an_offender_is_isolated_by_suspects_sitting_out(
    tmp_path: Path, synthetic_npz: Path, n: int
) -> None:
    """The last client masks an example count of 2^30 every round. Two groups of three cannot
    be formed, so each attempt while suspecting is one group of at least three with suspects
    sitting out, and each impossible sum loses its round (four: the first, and one per suspect
    narrowed away). The offender is excluded by name by round 7 (at most one sit-out round per
    step), no honest client ever is, the run finishes, and every round that was not lost is the
    exact mean of the honest clients counted in it."""
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    flags = ("--secagg", "--secagg-timeout", "10", "--round-timeout", "20", "--finish-grace", "1")
    server = start(*server_command(port, synthetic_npz, out, rounds=8, clients=n, extra=flags), log=log)
    wait_for_line(log, f"waiting for {n} clients", process=server)
    initial = CheckpointStore(out / "checkpoint").load()
    assert initial is not None
    honest = tuple(range(1, n))
    clients = start_clients(port, synthetic_npz, tmp_path, ids=honest, extra=("--insecure", "--light"))
    peer = _peer(port, tmp_path, n, "count")
    assert finish(server, log) == 0, log.read_text()
    finish_all(clients)
    text = log.read_text()
    assert f"client {n} is left out of secure aggregation from now on" in text
    assert all(f"client {h} is left out" not in text for h in honest)
    assert "sit this attempt out" in text and "attempts in a row" not in text
    history = json.loads((out / "history.json").read_text())
    rounds = history["rounds"]
    lost = [r["round"] for r in rounds if "lost" in r]
    assert len(lost) == 4 and lost[0] == 1 and "round 1 lost: its secure-aggregation sum" in text, lost
    assert all(not r["clients"] and r["start_digest"] == r["end_digest"] for r in rounds if "lost" in r)
    counted = [[c["client_id"] for c in r["clients"]] for r in rounds]
    assert len(counted) == 8 and all(n not in r and len(r) in (0, 3, 4) for r in counted), counted
    assert counted[-1] == list(honest)  # after the exclusion: every honest client, one group
    final = CheckpointStore(out / "checkpoint").load()
    assert final is not None and final.round == 8
    for got, want in zip(final.weights, _replay(initial.weights, counted), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    finish_all([peer])


def test_with_three_clients_an_offender_costs_rounds_but_cannot_stop_the_run(
    tmp_path: Path, synthetic_npz: Path
) -> None:
    """Among three, leaving the offender out would unmask a sum of two: an impossible sum is not
    counted as a failure, its round is lost (recorded, weights unchanged; another attempt at it
    would reveal the difference of two sums if a client dropped), nobody is excluded, and the
    server finishes the run with exit 0."""
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    flags = ("--secagg", "--secagg-timeout", "10", "--round-timeout", "20", "--finish-grace", "1")
    server = start(*server_command(port, synthetic_npz, out, rounds=2, clients=3, extra=flags), log=log)
    wait_for_line(log, "waiting for 3 clients", process=server)
    initial = CheckpointStore(out / "checkpoint").load()
    assert initial is not None
    clients = start_clients(port, synthetic_npz, tmp_path, ids=(1, 2), extra=("--insecure", "--light"))
    peer = _peer(port, tmp_path, 3, "count")
    assert finish(server, log) == 0, log.read_text()
    finish_all(clients)
    finish_all([peer])
    text = log.read_text()
    assert "is left out" not in text and "attempts in a row" not in text
    assert "round 1 lost: its secure-aggregation sum was impossible, and among 3 clients" in text
    assert "round 2 lost" in text and "the sender cannot be isolated" in text
    history = json.loads((out / "history.json").read_text())
    assert history["finished"] and [r["round"] for r in history["rounds"]] == [1, 2]
    for record in history["rounds"]:
        assert record["clients"] == [] and "cannot be isolated" in record["lost"]
        assert record["start_digest"] == record["end_digest"]
    final = CheckpointStore(out / "checkpoint").load()
    assert final is not None and final.round == 2
    for got, want in zip(final.weights, initial.weights, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("flags", "refused"),
    [
        (("--strategy", "median"), "--strategy median"),
        (("--compression", "int8"), "compression"),
        (("--record-updates",), "--record-updates"),
        (("--dp-clip", "1", "--dp-noise-multiplier", "1", "--dp-clip-on", "server"), "--dp-clip-on server"),
    ],
)
def test_what_needs_single_updates_is_refused_at_start(
    tmp_path: Path, synthetic_npz: Path, flags: tuple[str, ...], refused: str
) -> None:
    log = tmp_path / "server.log"
    command = server_command(
        free_port(), synthetic_npz, tmp_path / "out", rounds=1, clients=3, extra=("--secagg", *flags)
    )
    assert finish(start(*command, log=log), log) == 2
    assert refused in log.read_text()


def test_dp_fedavg_under_secure_aggregation_clips_on_the_clients(tmp_path: Path, synthetic_npz: Path) -> None:
    """--dp-clip with --secagg: clients clip to L2 1 and weigh 1 each; the server divides the
    unmasked sum by the round's size (no noise here, so the result can be checked exactly)."""
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    flags = ("--secagg", "--dp-clip", "1.0", "--dp-noise-multiplier", "0", "--finish-grace", "1")
    server = start(*server_command(port, synthetic_npz, out, rounds=1, clients=3, extra=flags), log=log)
    wait_for_line(log, "waiting for 3 clients", process=server)
    initial = CheckpointStore(out / "checkpoint").load()  # round 0: the run's starting weights
    assert initial is not None and initial.round == 0
    finish_all(start_clients(port, synthetic_npz, tmp_path, extra=("--insecure", "--light")))
    assert finish(server, log) == 0, log.read_text()
    history = json.loads((out / "history.json").read_text())
    assert history["run"]["secagg"] == {"bound": 1.0, "max_examples": 1, "threshold": 0.5}
    start_weights = initial.weights
    clipped = []
    for client in (1, 2, 3):
        sent = light_update(start_weights, client, 1)
        change = [u.astype(np.float64) - g for u, g in zip(sent, start_weights, strict=True)]
        norm = float(np.sqrt(sum(float((c**2).sum()) for c in change)))
        assert norm > 1  # so clipping matters
        clipped.append([c / norm for c in change])
    final = CheckpointStore(out / "checkpoint").load()
    assert final is not None and final.round == 1
    for index, got in enumerate(final.weights):
        want = start_weights[index] + sum(c[index] for c in clipped) / 3
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


# -- what the README promises, in live runs ----------------------------------------------------------


def _light_threads(port: int, ids: Sequence[int]) -> list[threading.Thread]:
    """Light clients (the real client code, no TensorFlow) as threads of this process: cheap
    enough for rounds larger than the complete-graph limit."""
    from fedgrpc.client.light import run_light_client

    threads = [
        threading.Thread(
            target=run_light_client,
            args=(f"127.0.0.1:{port}", c),
            kwargs={"connect_timeout_s": 120},
            daemon=True,
        )
        for c in ids
    ]
    for thread in threads:
        thread.start()
    return threads


def _start_weights(log: Path, out: Path, server: subprocess.Popen[bytes], clients: int) -> list[np.ndarray]:
    wait_for_line(log, f"waiting for {clients} clients", process=server)
    initial = CheckpointStore(out / "checkpoint").load()
    assert initial is not None and initial.round == 0
    return list(initial.weights)


def test_secagg_plus_with_a_sparse_neighbour_graph_gives_the_exact_mean(
    tmp_path: Path, synthetic_npz: Path
) -> None:
    """24 clients: past the complete-graph limit of 20, each client masks with about 2 log2 n
    neighbours, not all 23 others; the unmasked round is still the exact weighted mean."""
    n = 24
    assert sa.neighbour_degree(n) < n - 1
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    flags = ("--secagg", "--finish-grace", "1", "--eval-every", "0")
    server = start(*server_command(port, synthetic_npz, out, rounds=1, clients=n, extra=flags), log=log)
    start_weights = _start_weights(log, out, server, n)
    threads = _light_threads(port, range(1, n + 1))
    assert finish(server, log) == 0, log.read_text()
    for thread in threads:
        thread.join(60)
    history = json.loads((out / "history.json").read_text())
    secure = history["rounds"][0]["secagg"]
    assert secure["neighbours"] == sa.neighbour_degree(n) == 10 and secure["submitted"] == n
    assert [c["client_id"] for c in history["rounds"][0]["clients"]] == list(range(1, n + 1))
    final = CheckpointStore(out / "checkpoint").load()
    assert final is not None
    spec = history["run"]["secagg"]
    scale = sa.ring_scale(n, spec["max_examples"], spec["bound"])
    rounding = n * 0.5 / scale / sum(light_examples(c) for c in range(1, n + 1))  # half a step each
    for got, want in zip(final.weights, _replay(start_weights, [range(1, n + 1)]), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=rounding + 1e-7)


def test_secagg_threshold_sets_how_many_shares_rebuild_a_secret(tmp_path: Path, synthetic_npz: Path) -> None:
    """--secagg-threshold 0.8 among 4 holders needs all 4 shares (0.5 would need 3): client 1
    vanishing after sharing leaves 3 holders, so the survivors, who know the run's threshold,
    refuse to reveal and the attempt aborts; the next attempt, without client 1 (3 holders, 3
    needed), is the exact mean of the 3 others."""
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    flags = ("--secagg", "--secagg-threshold", "0.8", "--secagg-timeout", "6", "--round-timeout", "8",
             "--finish-grace", "1")  # fmt: skip
    server = start(*server_command(port, synthetic_npz, out, rounds=1, clients=4, extra=flags), log=log)
    start_weights = _start_weights(log, out, server, 4)
    clients = start_clients(port, synthetic_npz, tmp_path, ids=(2, 3, 4), extra=("--insecure", "--light"))
    peer = _peer(port, tmp_path, 1, "share")
    assert finish(server, log) == 0, log.read_text()
    finish_all([*clients, peer])
    text = log.read_text()
    assert "0 of 3 clients revealed their shares" in text
    assert "0 shares of client 2's self mask arrived and 4 are needed" in text
    history = json.loads((out / "history.json").read_text())
    assert history["run"]["secagg"]["threshold"] == 0.8
    assert [c["client_id"] for c in history["rounds"][0]["clients"]] == [2, 3, 4]
    final = CheckpointStore(out / "checkpoint").load()
    assert final is not None
    for got, want in zip(final.weights, _replay(start_weights, [(2, 3, 4)]), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_fedadam_under_secure_aggregation_steps_on_the_unmasked_mean(
    tmp_path: Path, synthetic_npz: Path
) -> None:
    """--strategy fedadam with --secagg, two rounds: each round's pseudo-gradient is the
    unmasked weighted mean change, and the global weights follow FedAdam's rule (Reddi et al.
    2021, no bias correction, v from tau^2) with its state carried from round 1 to round 2."""
    lr, beta1, beta2, tau = 0.1, 0.9, 0.99, 1e-3
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    flags = ("--secagg", "--strategy", "fedadam", "--server-lr", str(lr), "--server-momentum", str(beta1),
             "--server-beta2", str(beta2), "--server-tau", str(tau), "--finish-grace", "1")  # fmt: skip
    server = start(*server_command(port, synthetic_npz, out, rounds=2, clients=3, extra=flags), log=log)
    start_weights = _start_weights(log, out, server, 3)
    finish_all(start_clients(port, synthetic_npz, tmp_path, extra=("--insecure", "--light")))
    assert finish(server, log) == 0, log.read_text()
    weights = [np.asarray(w, np.float64) for w in start_weights]
    m = [np.zeros_like(w) for w in weights]
    v = [np.full_like(w, tau**2) for w in weights]
    total = sum(light_examples(c) for c in (1, 2, 3))
    for number in (1, 2):
        sent = {c: light_update([w.astype(np.float32) for w in weights], c, number) for c in (1, 2, 3)}
        for i, x in enumerate(weights):
            delta = sum(light_examples(c) * (sent[c][i].astype(np.float64) - x) for c in (1, 2, 3)) / total
            m[i] = beta1 * m[i] + (1 - beta1) * delta
            v[i] = beta2 * v[i] + (1 - beta2) * delta**2
            weights[i] = x + lr * m[i] / (np.sqrt(v[i]) + tau)
    final = CheckpointStore(out / "checkpoint").load()
    assert final is not None and final.round == 2
    for got, want, begin in zip(final.weights, weights, start_weights, strict=True):
        assert np.abs(want - begin).max() > 0.01  # the steps are far larger than any rounding
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-5)
