"""Server optimizers and FedProx against the papers' formulas, alone and with real processes."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from fedgrpc.client.light import light_examples, light_update
from fedgrpc.common.errors import ConfigError
from fedgrpc.common.processes import free_port
from fedgrpc.server.checkpoint import CheckpointStore
from fedgrpc.server.strategy import StrategySettings, add_update, make_strategy
from helpers import finish, finish_all, server_command, start, start_clients, wait_for_line

X0 = [np.array([1.0, -2.0, 0.5], np.float32), np.array([[0.25]], np.float32)]
ROUNDS = [  # each round: (client weights, example count) pairs, as offsets from that round's start
    [([0.1, 0.3, -0.2], [[0.05]], 10), ([0.3, -0.1, 0.0], [[-0.15]], 30)],
    [([-0.2, 0.2, 0.4], [[0.1]], 20), ([0.0, 0.1, 0.1], [[0.0]], 20)],
    [([0.05, -0.3, 0.2], [[0.2]], 5), ([0.1, 0.0, -0.1], [[-0.1]], 15)],
]


def run_strategy(settings: StrategySettings, rounds: list = ROUNDS) -> list[list[np.ndarray]]:  # type: ignore[type-arg]
    """The global weights after each round, through the strategy as the server drives it."""
    strategy, x = make_strategy(settings), [w.copy() for w in X0]
    history = []
    for updates in rounds:
        strategy.begin_round(x, len(updates))
        for a, b, n in updates:
            offsets = [np.array(a, np.float32), np.array(b, np.float32)]
            add_update(strategy, [w + o for w, o in zip(x, offsets, strict=True)], x, n)
        x = strategy.result()
        history.append(x)
    return history


def mean_changes(rounds: list = ROUNDS) -> list[list[np.ndarray]]:  # type: ignore[type-arg]
    """Delta_t of Reddi et al.: the example-weighted mean of the clients' changes, in float64."""
    deltas = []
    for updates in rounds:
        total = sum(n for _, _, n in updates)
        deltas.append([
            sum(np.array(u[i], np.float64) * u[2] for u in updates) / total for i in range(2)
        ])  # fmt: skip
    return deltas


def by_hand(
    rule: str, lr: float, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3
) -> list[list[np.ndarray]]:
    """The papers' update rules written out: FedAvgM (Hsu et al. 2019), FedAdagrad/FedAdam/FedYogi
    (Reddi et al. 2021, Algorithm 2, v_{-1} = tau^2)."""
    x = [w.astype(np.float64) for w in X0]
    m = [np.zeros_like(w) for w in x]
    v = [np.zeros_like(w) if rule == "fedavgm" else np.full_like(w, tau * tau) for w in x]
    history = []
    for delta in mean_changes():
        for i, d in enumerate(delta):
            if rule == "fedavgm":
                v[i] = b1 * v[i] + d
                x[i] = x[i] + lr * v[i]
                continue
            m[i] = b1 * m[i] + (1 - b1) * d
            if rule == "fedadagrad":
                v[i] = v[i] + d**2
            elif rule == "fedadam":
                v[i] = b2 * v[i] + (1 - b2) * d**2
            else:
                v[i] = v[i] - (1 - b2) * d**2 * np.sign(v[i] - d**2)
            x[i] = x[i] + lr * m[i] / (np.sqrt(v[i]) + tau)
        history.append([w.copy() for w in x])
    return history


@pytest.mark.parametrize(
    ("name", "lr"), [("fedavgm", 1.0), ("fedadagrad", 0.1), ("fedadam", 0.1), ("fedyogi", 0.1)]
)
def test_server_optimizers_follow_the_papers_rules(name: str, lr: float) -> None:
    got = run_strategy(StrategySettings(name, server_lr=lr))
    want = by_hand(name, lr)
    for got_round, want_round in zip(got, want, strict=True):
        for g, w in zip(got_round, want_round, strict=True):
            assert g.dtype == np.float32
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_fedavgm_without_momentum_and_lr_1_is_fedavg() -> None:
    plain = run_strategy(StrategySettings("fedavg"))
    momentum_free = run_strategy(StrategySettings("fedavgm", server_lr=1.0, server_momentum=0.0))
    for a, b in zip(plain, momentum_free, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-7)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_the_state_carries_the_trajectory_through_a_restart(name: str) -> None:
    """state() after round 2, restore() into a new strategy: round 3 as if never interrupted."""
    uninterrupted = run_strategy(StrategySettings(name))[-1]
    first = make_strategy(StrategySettings(name))
    x = [w.copy() for w in X0]
    for updates in ROUNDS[:2]:
        first.begin_round(x, 2)
        for a, b, n in updates:
            add_update(first, [x[0] + np.asarray(a, np.float32), x[1] + np.asarray(b, np.float32)], x, n)
        x = first.result()
    second = make_strategy(StrategySettings(name))
    second.restore({k: v.copy() for k, v in first.state().items()})
    second.begin_round(x, 2)
    for a, b, n in ROUNDS[2]:
        add_update(second, [x[0] + np.asarray(a, np.float32), x[1] + np.asarray(b, np.float32)], x, n)
    for got, want in zip(second.result(), uninterrupted, strict=True):
        np.testing.assert_array_equal(got, want)  # bit for bit: the same arithmetic in the same order


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            dict(name="median", server_lr=0.1),
            "--server-lr set a server optimizer, which --strategy median does not",
        ),
        (dict(name="fedavg", server_momentum=0.9), "does not have; use one of fedavgm"),
        (dict(name="fedavgm", server_beta2=0.9), "--server-beta2 and --server-tau belong to"),
        (dict(name="fedadam", server_lr=-1.0), "--server-lr must be positive"),
        (dict(name="fedavgm", server_momentum=1.0), r"--server-momentum must be in \[0, 1\)"),
        (dict(name="fedprox", proximal_mu=-0.1), "--proximal-mu must be >= 0"),
    ],
)
def test_combinations_that_cannot_work_are_refused_at_start(settings: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=message):
        make_strategy(StrategySettings(**settings))


def test_fedprox_pulls_toward_the_global_weights_like_the_papers_loss_term() -> None:
    """Two SGD steps on a linear model with the proximal term, against the gradient written out:
    w' = w - lr * (grad L(w) + mu * (w - w_global))."""
    import keras
    from fedgrpc.client import proximal
    from fedgrpc.common.models import FreshOptimizer

    x = np.array([[1.0, 2.0], [0.5, -1.0]], np.float32)
    y = np.array([[1.0], [0.0]], np.float32)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    optimizer = proximal.install(model, mu=0.5)
    fresh = FreshOptimizer(model)
    w_global = np.array([[0.3], [-0.2]], np.float32)
    model.set_weights([w_global])
    fresh.reset()
    optimizer.set_anchors()
    w = w_global.astype(np.float64)
    for _ in range(2):
        model.train_on_batch(x, y)
        grad = 2 * x.T @ (x @ w - y) / len(x)  # mse over the batch
        w = w - 0.1 * (grad + 0.5 * (w - w_global))
    np.testing.assert_allclose(model.get_weights()[0], w, rtol=1e-5)
    assert not np.allclose(w, w_global)


# -- end to end: a real fl-server and light clients ------------------------------------------


def light_trajectory(
    start_weights: list[np.ndarray], rounds: int, clients: int, settings: StrategySettings
) -> list[np.ndarray]:
    """What the server must produce when light clients 1..N train `rounds` rounds from start_weights."""
    strategy, x = make_strategy(settings), start_weights
    for number in range(1, rounds + 1):
        strategy.begin_round(x, clients)
        for client in range(1, clients + 1):
            add_update(strategy, light_update(x, client, number), x, light_examples(client))
        x = strategy.result()
    return x


def initial_model(folder: Path) -> tuple[Path, list[np.ndarray]]:
    """A saved reference CNN to start the run from (--init-model), and its weights."""
    import keras
    from fedgrpc.common.models import reference_cnn

    keras.utils.set_random_seed(7)
    model = reference_cnn()
    path = folder / "initial.keras"
    model.save(path)
    return path, model.get_weights()


def final_weights(out: Path) -> list[np.ndarray]:
    import keras

    return keras.models.load_model(out / "final_model.keras").get_weights()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("name", "lr"), [("fedavgm", "0.5"), ("fedadagrad", "0.01"), ("fedadam", "0.01"), ("fedyogi", "0.01")]
)
def test_each_server_optimizer_end_to_end(tmp_path: Path, synthetic_npz: Path, name: str, lr: str) -> None:
    initial, weights = initial_model(tmp_path)
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    extra = ("--strategy", name, "--server-lr", lr, "--init-model", str(initial))
    server = start(*server_command(port, synthetic_npz, out, rounds=3, clients=3, extra=extra), log=log)
    finish_all(start_clients(port, synthetic_npz, tmp_path, extra=("--insecure", "--light")))
    assert finish(server, log) == 0, log.read_text()
    expected = light_trajectory(weights, 3, 3, StrategySettings(name, server_lr=float(lr)))
    for got, want in zip(final_weights(out), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)  # float32 sums in arrival order
    checkpoint = CheckpointStore(out / "checkpoint").load()
    slots = ("velocity",) if name == "fedavgm" else ("m", "v")
    assert checkpoint is not None
    assert set(checkpoint.strategy_state) == {
        f"{slot}/{i:04d}" for slot in slots for i in range(len(weights))
    }


def test_a_resumed_server_continues_the_same_fedadam_trajectory(tmp_path: Path, synthetic_npz: Path) -> None:
    """Killed (SIGKILL) after round 2 of 4 and restarted: the final weights are those of an
    uninterrupted run, within float32 rounding (the sum's order follows the updates' arrival)."""
    initial, weights = initial_model(tmp_path)
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    extra = ("--strategy", "fedadam", "--init-model", str(initial))
    command = server_command(port, synthetic_npz, out, rounds=4, clients=3, extra=extra)
    server = start(*command, log=log)
    clients = start_clients(
        port, synthetic_npz, tmp_path, extra=("--insecure", "--light", "--connect-timeout", "120")
    )
    wait_for_line(log, "round 2/4", process=server)
    server.send_signal(signal.SIGKILL)
    server.wait()
    restarted = start(*command, log=log)
    finish_all(clients)
    assert finish(restarted, log) == 0, log.read_text()
    assert "resuming run" in log.read_text()
    expected = light_trajectory(weights, 4, 3, StrategySettings("fedadam"))
    for got, want in zip(final_weights(out), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_a_round_that_would_make_the_model_non_finite_is_aborted(tmp_path: Path, synthetic_npz: Path) -> None:
    """A server optimizer with an absurd learning rate: every round's new weights overflow. Each
    round is aborted and trained again from the same weights; after three the server stops, and
    the checkpoint never held anything but finite weights."""
    port, out, log = free_port(), tmp_path / "out", tmp_path / "server.log"
    extra = ("--strategy", "fedadam", "--server-lr", "1e39")
    server = start(*server_command(port, synthetic_npz, out, rounds=2, clients=3, extra=extra), log=log)
    clients = start_clients(
        port, synthetic_npz, tmp_path, extra=("--insecure", "--light", "--connect-timeout", "20")
    )
    assert server.wait(timeout=180) == 2, log.read_text()
    for process, _ in clients:
        process.kill()
    text = log.read_text()
    assert text.count("aborted") == 3 and "round 1 aborted (3 in a row)" in text
    assert "Updates, largest first: client" in text
    assert "3 rounds in a row produced non-finite weights; stopping" in text
    checkpoint = CheckpointStore(out / "checkpoint").load()
    assert checkpoint is not None and checkpoint.round == 0
    assert all(np.isfinite(w).all() for w in checkpoint.weights)


def test_fedprox_end_to_end(tmp_path: Path, synthetic_npz: Path) -> None:
    """The proximal term reaches the clients' training: from the same start, a run with a large
    mu sends updates far closer to the global weights than the same run without it (Adam with
    mu (w - w_global) added to every gradient keeps each weight within a few steps of it)."""
    initial, weights = initial_model(tmp_path)
    drift: dict[float, list[float]] = {}
    for mu in (0.0, 1000.0):
        folder = tmp_path / f"mu-{mu:g}"
        folder.mkdir()
        port, out, log = free_port(), folder / "out", folder / "server.log"
        extra = (
            "--strategy",
            "fedprox",
            "--proximal-mu",
            str(mu),
            "--init-model",
            str(initial),
            "--record-updates",
        )
        server = start(*server_command(port, synthetic_npz, out, rounds=1, clients=2, extra=extra), log=log)
        finish_all(start_clients(port, synthetic_npz, folder, ids=(1, 2)))
        assert finish(server, log) == 0, log.read_text()
        history = json.loads((out / "history.json").read_text())
        assert history["run"]["proximal_mu"] == mu
        drift[mu] = []
        for client in (1, 2):
            with np.load(out / "updates" / "round-0001" / f"client-{client}.npz") as npz:
                sent = [npz[k] for k in sorted(npz.files)]
            change = [np.asarray(u, np.float64) - w for u, w in zip(sent, weights, strict=True)]
            drift[mu].append(float(np.sqrt(sum((c * c).sum() for c in change))))
    print(f"update's distance from the global weights: mu 0 {drift[0.0]}, mu 1000 {drift[1000.0]}")
    assert all(d > 0 for d in drift[1000.0])  # still trained
    for pulled, free in zip(drift[1000.0], drift[0.0], strict=True):
        assert pulled < 0.5 * free, drift
