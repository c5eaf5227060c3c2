"""Differential privacy: clipping and noise against their definitions, the accountant against the
library, and runs with real processes that spend a budget and stop at it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fedgrpc.common.privacy import PrivacyAccountant, clip_change, clip_factor, l2_norm, privatize_locally
from fedgrpc.common.processes import free_port
from fedgrpc.server.strategy import CentralDP, StrategySettings, add_update, make_strategy
from helpers import finish, finish_all, server_command, start, start_clients


def test_clipping_follows_its_definition() -> None:
    changes = [np.array([3.0, 0.0], np.float32), np.array([[4.0]], np.float32)]  # norm 5
    assert l2_norm(changes) == 5.0
    assert clip_factor(5.0, 10.0) == 1.0 and clip_factor(5.0, 2.0) == 0.4
    clipped = clip_change(changes, 2.0)
    np.testing.assert_allclose(clipped[0], [1.2, 0.0])
    np.testing.assert_allclose(clipped[1], [[1.6]])
    assert math.isclose(l2_norm(clipped), 2.0, rel_tol=1e-6)


def test_dp_fedavg_clips_each_update_weighs_it_1_and_divides_by_the_expected_count() -> None:
    start = [np.zeros(2, np.float32), np.zeros(1, np.float32)]
    strategy = make_strategy(
        StrategySettings(), CentralDP(clip=1.0, noise_multiplier=0.0, expected_updates=4)
    )
    strategy.begin_round(start, 4)
    updates = [([3.0, 4.0], [0.0], 1000), ([0.3, 0.0], [0.4], 1)]  # norms 5 (clipped to 1) and 0.5
    for a, b, n in updates:  # example counts do not matter under DP
        add_update(strategy, [np.array(a, np.float32), np.array(b, np.float32)], start, n)
    got = strategy.result()
    want_sum = [np.array([0.6 + 0.3, 0.8 + 0.0]), np.array([0.0 + 0.4])]  # clip(u1) + u2
    for g, w in zip(got, want_sum, strict=True):
        np.testing.assert_allclose(g, w / 4, rtol=1e-6)  # / expected updates, not / 2


def test_dp_noise_has_the_standard_deviation_it_claims() -> None:
    """With no updates in (a Poisson round that drew nobody), the new weights are noise alone:
    std = noise_multiplier * clip / expected updates."""
    start = [np.zeros(20_000, np.float32)]
    strategy = make_strategy(
        StrategySettings(), CentralDP(clip=2.0, noise_multiplier=1.5, expected_updates=3)
    )
    strategy.begin_round(start, 3)
    noise = strategy.result()[0]
    std = 1.5 * 2.0 / 3
    # Five standard errors each way: a correct sampler fails this about once in a million runs.
    assert abs(float(noise.mean())) < 5 * std / np.sqrt(noise.size)
    assert float(noise.std()) == pytest.approx(std, rel=5 / np.sqrt(2 * noise.size))


def test_local_dp_clips_then_adds_noise() -> None:
    rng = np.random.default_rng(0)
    reference: list[np.ndarray] = [np.zeros(50_000, np.float32), np.arange(3)]  # integers travel as they are
    weights: list[np.ndarray] = [np.full(50_000, 0.1, np.float32), np.arange(3) + 7]
    out = privatize_locally(weights, reference, clip=1.0, noise_multiplier=0.5, rng=rng)
    change = out[0] - reference[0]
    clipped_part = np.full(50_000, 1.0 / math.sqrt(50_000))  # 0.1 * sqrt(50,000) = 22 > 1: scaled to norm 1
    residual = change - clipped_part
    assert float(residual.std()) == pytest.approx(0.5, rel=0.02) and abs(float(residual.mean())) < 0.01
    np.testing.assert_array_equal(out[1], weights[1])


@pytest.mark.parametrize(
    ("sampling", "population", "per_round"), [("all", 10, 10), ("fixed", 100, 10), ("poisson", 100, 10)]
)
def test_the_accountant_is_the_libraries_own_computation(
    sampling: str, population: int, per_round: int
) -> None:
    import dp_accounting
    from dp_accounting import rdp

    accountant = PrivacyAccountant(1.1, 1e-5, sampling, population, per_round)
    gaussian = dp_accounting.GaussianDpEvent(1.1)
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    event: dp_accounting.DpEvent = gaussian
    if sampling == "fixed":
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
        event = dp_accounting.SampledWithoutReplacementDpEvent(population, per_round, gaussian)
    elif sampling == "poisson":
        event = dp_accounting.PoissonSampledDpEvent(per_round / population, gaussian)
    direct = rdp.RdpAccountant(list(range(2, 257)), neighboring_relation=relation)
    direct.compose(event, 7)
    assert accountant.epsilon(7) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)
    assert accountant.epsilon(1) < accountant.epsilon(7) < accountant.epsilon(20)
    assert accountant.epsilon(accountant.rounds_within(accountant.epsilon(7), 50)) <= accountant.epsilon(7)


def test_dp_and_a_robust_rule_do_not_mix() -> None:
    from fedgrpc.common.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a mean to add its noise to"):
        make_strategy(StrategySettings("median"), CentralDP(1.0, 1.0, 3))


def test_a_private_run_reports_epsilon_and_stops_at_its_budget(tmp_path: Path, synthetic_npz: Path) -> None:
    accountant = PrivacyAccountant(1.0, 1e-5)
    budget = (accountant.epsilon(3) + accountant.epsilon(4)) / 2  # room for 3 rounds, not 4
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    extra = ("--dp-clip", "1.0", "--dp-noise-multiplier", "1.0", "--dp-target-epsilon", str(budget))
    server = start(*server_command(port, synthetic_npz, out, rounds=6, clients=3, extra=extra), log=log)
    finish_all(start_clients(port, synthetic_npz, tmp_path, extra=("--insecure", "--light")))
    assert finish(server, log) == 0, log.read_text()
    history = json.loads((out / "history.json").read_text())
    assert history["finished"] is True and history["run"]["dp_clip"] == 1.0  # clients clip
    spent = [r["privacy"]["epsilon"] for r in history["rounds"]]
    assert spent == pytest.approx([accountant.epsilon(k) for k in (1, 2, 3)])
    text = log.read_text()
    assert "round 3/6" in text and "epsilon" in text and "round 4/6" not in text
    assert "round 4 would spend epsilon" in text and "the run ends after round 3" in text


def recorded(out: Path, round_number: int, client: int) -> list[np.ndarray]:
    with np.load(out / "updates" / f"round-{round_number:04d}" / f"client-{client}.npz") as npz:
        return [npz[k].astype(np.float64) for k in sorted(npz.files)]


def test_a_client_with_local_dp_sends_clipped_noised_updates_and_accounts_for_itself(
    tmp_path: Path, synthetic_npz: Path
) -> None:
    """What the server received from the private client (--record-updates), measured against the
    rounds' starting weights: its change is the clipped change plus N(0, (noise x clip)^2) per
    weight, so ||change||^2 = clip^2 + n (noise x clip)^2 within the noise's own spread. The clip
    is small beside a round's training (the plain client's change shows it) and the noise is large
    beside the clip (so both terms are measured): without the clip or without the noise the sum is
    far off."""
    import keras
    from fedgrpc.common.models import reference_cnn

    keras.utils.set_random_seed(3)
    initial = tmp_path / "initial.keras"
    reference_cnn().save(initial)
    start_weights = [w.astype(np.float64) for w in keras.models.load_model(initial).get_weights()]
    clip, noise = 0.1, 0.01
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    extra = ("--record-updates", "--init-model", str(initial))
    server = start(*server_command(port, synthetic_npz, out, rounds=2, clients=2, extra=extra), log=log)
    private = ("--insecure", "--local-dp-clip", str(clip), "--local-dp-noise-multiplier", str(noise))
    clients = start_clients(port, synthetic_npz, tmp_path, ids=(1,), extra=private)
    clients += start_clients(port, synthetic_npz, tmp_path, ids=(2,))
    finish_all(clients)
    assert finish(server, log) == 0, log.read_text()

    history = json.loads((out / "history.json").read_text())
    counts = {c["client_id"]: c["num_examples"] for c in history["rounds"][0]["clients"]}
    after_round_1 = [  # the global weights round 2 started from: round 1's weighted mean
        sum(recorded(out, 1, c)[i] * n for c, n in counts.items()) / sum(counts.values())
        for i in range(len(start_weights))
    ]
    n = sum(w.size for w in start_weights)
    std = noise * clip
    spread = 5 * (math.sqrt(2 * n) * std**2 + 2 * std * clip)  # 5 sd of ||noise||^2 + 2 <c, noise>
    for round_number, reference in ((1, start_weights), (2, after_round_1)):
        private_change = [u - g for u, g in zip(recorded(out, round_number, 1), reference, strict=True)]
        plain_change = [u - g for u, g in zip(recorded(out, round_number, 2), reference, strict=True)]
        assert sum((c * c).sum() for c in plain_change) > 10 * clip**2  # training moves far past the clip
        squared = sum((c * c).sum() for c in private_change)
        assert abs(squared - (clip**2 + n * std**2)) < spread, (round_number, squared, clip**2 + n * std**2)
    expected = PrivacyAccountant(noise, 1e-5).epsilon(2)
    assert (
        f"local DP: epsilon {expected:.3f} spent so far (delta 1e-05)"
        in (tmp_path / "client-1.log").read_text()
    )
